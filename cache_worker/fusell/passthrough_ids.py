"""Registering, closing and keeping the backing ids of :class:`~.passthrough.BackingTable`
(rules 3 and 7 of passthrough.py).

**Ids are kept after the last release** when the owner sets ``retain`` (the view keeps up to
4096, least recently released closed first; with 0 an id is closed at its last release): a loader opens each file once per epoch, so closing the id at every last release
made every open pay the registration again. A kept id holds the kernel's reference to the cache
file, so whoever owns the file must say when it changes or goes: the next open of an inode with
a kept id and no passthrough open asks ``still()`` (the view: is the cache file still the
verified one that was registered?) and closes the id if not; :meth:`BackingTable.drop` closes
it at once when the store evicts the file (its space comes back only when the kernel lets go).
A restarted worker closes every kept id at start (``_close_unused``), as before: the log and its
crash rules are unchanged, a kept id is just a ``b`` record without its ``c`` yet.

Measured cost (``bench/fusell_bench.py --table-cost``, 2 loaded cores): an open that must
register the backing file (os.open, BACKING_OPEN, and at its release BACKING_CLOSE) 40-49 us:
the cost every small-file open paid before ids were kept (the table's own bookkeeping is 6-8 us
a pair, passthrough_log.py).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from .iomode import Inode as _Inode

log = logging.getLogger("datahoard.cache_worker.fusell.passthrough")  # one log for the table, as before the split


class BackingIds:
    """Backing ids in and out of the kernel, and kept ones dropped.
    A part of :class:`.passthrough.BackingTable`, which sets up the state in ``__init__``."""

    def drop(self, nodeid: int) -> None:
        """The inode's cache file went (evicted, replaced): close a kept id now, so the kernel
        lets go of the file. An id still in use by passthrough opens is closed at their last
        release instead (they keep reading the file they opened). An armed node id is disarmed
        first (passthrough_native.py), and its arm released once no native open uses it."""
        with self._lock:
            self._disarm_locked(nodeid)
            ino = self._inodes.get(nodeid)
            if ino is not None and ino.backing_id is not None and ino.passthrough:
                self._doomed.add(nodeid)
            else:
                self._drop_locked(nodeid)

    def _drop_locked(self, nodeid: int) -> None:
        self._retained.pop(nodeid, None)
        ino = self._inodes.get(nodeid)
        if ino is None or ino.backing_id is None or ino.passthrough:
            return
        self._close(nodeid, ino)
        if not ino.fhs:
            del self._inodes[nodeid]

    def _register(self, nodeid: int, ino: _Inode, backing: Callable[[], int | None]) -> int | None:
        fd = backing()
        if fd is None:  # not whole and verified after all
            return None
        try:
            bid = self.conn.backing_open(fd)
        except OSError as e:
            log.warning("passthrough refused for node %d (%s); serving it through the worker",
                        nodeid, e)
            return None
        finally:
            os.close(fd)
        self._log("b", nodeid, 0, bid)
        ino.backing_id = bid
        return bid

    def _close(self, nodeid: int, ino: _Inode) -> None:
        bid = ino.backing_id
        self._log("c", nodeid, 0, bid)  # before the ioctl: never reuse an id the kernel closed
        ino.backing_id = None
        self._doomed.discard(nodeid)
        if self.on_close is not None:
            self.on_close(nodeid)
        try:
            self.conn.backing_close(bid)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("closing backing id %d failed: %s", bid, e)

    def _close_unused(self) -> None:
        """Ids registered by a process that died before (or after) using them."""
        with self._lock:
            for nodeid, ino in list(self._inodes.items()):
                if ino.backing_id is not None and not ino.passthrough:
                    self._close(nodeid, ino)
                if not ino.fhs and ino.backing_id is None:
                    del self._inodes[nodeid]
