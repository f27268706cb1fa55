"""Node ids armed for the native responder (fastopen.c): the part of
:class:`~.passthrough.BackingTable` that lets opens of a file be answered without Python.

**An arm is a handle.** Arming a node id logs one passthrough open of it with a reserved handle,
``ARM_FH + slot``, and keeps it open: for the table (and the kernel's rules 1-3 in
passthrough.py) the inode is then in passthrough use with its id, so the id is never closed
or replaced while native opens may name it. Native opens are not logged one by one: each is
counted in its slot's counter (``<log>.opens``, 8 bytes a slot, in the same kind of shared
tmpfs mapping as the log), raised before the reply and lowered after the RELEASE reply, so a
crash leaves a count too high, never too low (an id kept open, never one closed under an open).

**Disarming** (the file was evicted or changed, the slot is wanted for another file, the worker
restarted, an open came to Python after all) first removes the node id from the C table, after
which no native open can name it; the arm's handle is released once its count is 0
(:meth:`NativeArms.settle`, called every ``SETTLE_SECONDS`` by the view): then the table's usual
rules apply (the id is kept for reuse, checked at its next open, or closed if doomed).

**Across restarts** the arms are in the log and the counts in their file, but the C table is
not: a new process starts with every inherited arm disarmed (so its file is checked again by
Python before it is armed again), and the native releases of the old handles, which come to the
new process, count down the same slots. A process without the native part (``fastopen.load``
refused) counts them down in Python.

**Bound**: ``arms`` (:func:`arms_for`: a share of the node's memory). An arm holds the kernel's
reference to one cache file, and with it that file's dentry and inode, which the kernel can then
not reclaim; that is why arms are bounded at all. Past the bound the least recently opened file
is disarmed, and its next open is answered in Python (about 300 us) and armed again. The bound
was a fixed 65,536 at first, and a dataset of more files than that lost the native part in just
the case passthrough is chosen for (a dataset larger than memory): read in a new order every
epoch (a shuffled ImageNet: 1.28 million files), about 65,536/1.28M = 5% of its opens found an
arm; read in the same order, none did (an LRU over a longer cycle evicts each arm before its
use). ``bench.hot --files 100000 --sizes 4000-16000`` measured the second: 0.09 of local disk
with the page cache dropped, 0.46 with the bound on memory (bench/ANALYSIS.md). Slots are taken
as arms are made, so a small dataset costs a small table.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
from collections import OrderedDict

from .fastopen import SLOT_SHIFT, NATIVE_FH, NativeOpens
from .iomode import PASSTHROUGH

log = logging.getLogger("datahoard.cache_worker.fusell.passthrough")

#: Handles of arms: ARM_FH + slot (the table's own handles are serials far below).
ARM_FH = 1 << 40
_COUNT = struct.Struct("=q")

#: Memory one arm holds, measured (2026-12-06, 100,000 arms, Linux 6.18): in the kernel, 517 B of
#: unreclaimable slab for the registered file, and about 1.4 KB for the cache file's dentry and
#: inode (ext4), which it could otherwise reclaim; in the worker, 2.0 KB of RSS (712 B of Python
#: objects in the table, the log's and the counts' pages, the C table with the path).
ARM_BYTES = 4 * 1024
#: Arms may hold at most 1/ARM_MEMORY_SHARE of the node's memory (about 2%): 131,000 arms on
#: 24 GiB, 1.4 million on 256 GiB.
ARM_MEMORY_SHARE = 48
#: Arms without a known memory size, and the least on any node without a memory limit.
DEFAULT_ARMS = 1 << 16
#: Arms may hold at most 1/ARM_LIMIT_SHARE of the worker's own memory limit: the kernel charges
#: what they hold to the worker's cgroup, so on a big node a pod limit (4Gi by default) would
#: otherwise be outrun (1.4 million arms on 256 GiB hold 5.6 GB) and the worker OOM-killed.
ARM_LIMIT_SHARE = 8
#: The least any limit leaves.
MIN_ARMS = 1024


def arms_for(memory_bytes: int, limit_bytes: int = 0) -> int:
    """How many node ids may be armed by a worker on a node with ``memory_bytes`` of memory (0:
    unknown) whose own memory limit is ``limit_bytes`` (0: none)."""
    arms = DEFAULT_ARMS if memory_bytes <= 0 else max(DEFAULT_ARMS, memory_bytes // ARM_MEMORY_SHARE // ARM_BYTES)
    if limit_bytes > 0:
        arms = min(arms, max(MIN_ARMS, limit_bytes // ARM_LIMIT_SHARE // ARM_BYTES))
    return arms


def is_arm(fh: int) -> bool:
    return ARM_FH <= fh < ARM_FH * 2


def native_slot(fh: int) -> int | None:
    """The slot of a handle the native part gave out (as the view sees it), else None."""
    return (fh & ~NATIVE_FH) >> SLOT_SHIFT if fh & NATIVE_FH else None


class NativeArms:
    """Arming, disarming and settling.
    A part of :class:`.passthrough.BackingTable`, which sets up the state in ``__init__``
    (``_open_counts`` after the log is loaded)."""

    def _open_counts(self, arms: int) -> None:
        """Map ``<log>.opens`` for ``arms`` slots (more if an inherited arm holds a higher one);
        zero the count of every slot no inherited arm holds, and disarm every inherited arm
        (see the module docstring)."""
        held = {fh - ARM_FH: node for node, ino in self._inodes.items() for fh in ino.fhs if is_arm(fh)}
        #: Slots there are; those below ``_next_slot`` were taken (in use, draining or in ``_free``).
        self.slots = max(arms, max(held, default=-1) + 1)
        path = self.path.with_name(self.path.name + ".opens")
        size = self.slots * _COUNT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse on tmpfs: pages are used as slots are
            self._counts = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # Stale counts are rare and the mapping large: find the nonzero bytes at C speed.
        for slot in {m.start() // _COUNT.size for m in re.finditer(rb"[^\x00]", self._counts)} - held.keys():
            _COUNT.pack_into(self._counts, slot * _COUNT.size, 0)
        self._armed: OrderedDict[int, int] = OrderedDict()  # node id -> slot, oldest first
        self._draining: dict[int, int] = {node: slot for slot, node in held.items()}
        self._next_slot = max(held, default=-1) + 1
        self._free = [s for s in range(self._next_slot - 1, -1, -1) if s not in held]
        self.native: NativeOpens | None = None

    def start_native(self, lib, fd: int) -> NativeOpens:
        self.native = NativeOpens(lib, fd, self._counts, self.slots)
        return self.native

    def count(self, slot: int) -> int:
        return _COUNT.unpack_from(self._counts, slot * _COUNT.size)[0]

    def arm(self, nodeid: int, path: str, identity: tuple[int, int, int, int]) -> bool:
        """Let the native part answer opens of ``nodeid``, which Python just answered with
        passthrough of the verified file ``path`` (``identity``: its inode, size, mtime_ns and
        ctime_ns then). False if not armed."""
        native = self.native
        if native is None:
            return False
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None or ino.backing_id is None or not ino.passthrough or nodeid in self._doomed:
                return False
            if nodeid in self._armed:
                self._armed.move_to_end(nodeid)
                return True
            slot = self._draining.pop(nodeid, None)
            if slot is None:
                slot = self._take_slot()
                if slot is None:
                    return False  # every slot still counts open handles
                fh = ARM_FH + slot
                self._log("o", nodeid, fh, ino.backing_id, PASSTHROUGH)
                ino.add(fh, PASSTHROUGH)
                self._fh_node[fh] = nodeid
            if not native.arm(nodeid, ino.backing_id, slot, path, identity):
                self._draining[nodeid] = slot
                self._settle_locked(nodeid)
                return False
            self._armed[nodeid] = slot
            return True

    def _take_slot(self) -> int | None:
        if not self._free and self._next_slot < self.slots:
            self._next_slot += 1
            return self._next_slot - 1
        if not self._free and self._armed:
            self._disarm_locked(next(iter(self._armed)))  # the least recently opened
        return self._free.pop() if self._free else None

    def disarm(self, nodeid: int) -> None:
        with self._lock:
            self._disarm_locked(nodeid)

    def is_armed(self, nodeid: int) -> bool:
        return nodeid in self._armed

    def armed_count(self) -> int:
        return len(self._armed)

    def used(self, nodeids) -> None:
        """Opens of these node ids were answered natively: keep them longest."""
        with self._lock:
            armed = self._armed
            for nodeid in nodeids:
                if nodeid in armed:
                    armed.move_to_end(nodeid)

    def native_released(self, slot: int) -> None:
        """A RELEASE of a native handle reached Python (no native part in this process)."""
        if not 0 <= slot < self.slots:
            return
        if self.native is not None:
            self.native.released(slot)
            return
        with self._lock:
            off = slot * _COUNT.size
            _COUNT.pack_into(self._counts, off, _COUNT.unpack_from(self._counts, off)[0] - 1)

    def settle(self) -> int:
        """Release the arms of disarmed node ids whose native opens are all released; how
        many are still waiting."""
        with self._lock:
            for nodeid in list(self._draining):
                self._settle_locked(nodeid)
            return len(self._draining)

    def _disarm_locked(self, nodeid: int) -> None:
        slot = self._armed.pop(nodeid, None)
        if slot is None:
            return
        if self.native is not None:
            self.native.disarm(nodeid)
        self._draining[nodeid] = slot
        self._settle_locked(nodeid)

    def _settle_locked(self, nodeid: int) -> None:
        slot = self._draining[nodeid]
        if self.count(slot) > 0:
            return
        del self._draining[nodeid]
        _COUNT.pack_into(self._counts, slot * _COUNT.size, 0)
        self._release_locked(nodeid, ARM_FH + slot)
        self._free.append(slot)

    def _close_counts(self) -> None:
        if self.native is not None:
            self.native.close()
            self.native = None
        if self._counts is not None:
            try:
                self._counts.close()
            except BufferError:  # still exported somewhere: the mapping goes with the process
                log.warning("the native open counts are still in use; left mapped")
            self._counts = None

