"""FOPEN_PASSTHROUGH: the kernel's rules, and :class:`BackingTable`, which keeps them across
worker restarts.

The rules (read in Linux 6.9-6.18 ``fs/fuse/iomode.c``, ``passthrough.c``, ``backing.c``,
``file.c``, ``dev.c`` and ``fuse_i.h``):

1. **Each inode has one io mode at a time**, counted by ``fi->iocachectr``: > 0 caching
   (page-cache reads through the daemon), < 0 "uncached" (passthrough), 0 neutral.
   ``fuse_file_io_open`` runs after the OPEN reply: an open answered *without*
   FOPEN_PASSTHROUGH while the inode has a backing file fails; an open answered *with* it while
   caching opens exist fails (``fuse_inode_uncached_io_start`` -> ETXTBSY). Both reach the user
   as **EIO** from open(2) ("Using incorrect open mode is a server mistake"). The kernel then
   sends RELEASE for that open (``fuse_sync_release``), so every successful OPEN reply is
   balanced by exactly one RELEASE.
2. **One backing file per inode.** The first passthrough open sets the inode's backing
   (``fuse_inode_backing_set``); every later concurrent passthrough open must name the SAME
   backing id (the same ``struct fuse_backing``: registering the same file twice gives two
   different ones) or it fails with EBUSY -> EIO. An id that is not registered (never opened,
   or closed) fails with ENOENT -> EIO.
3. **When an id may be closed.** The inode holds its own reference to the backing file from
   the first passthrough open until its last passthrough open is released
   (``fuse_inode_uncached_io_end`` puts it), and every passthrough file holds its own opened
   backing file. So FUSE_DEV_IOC_BACKING_CLOSE right after the OPEN reply never breaks reads
   of that open - but then the next concurrent open of the inode can name neither the closed
   id (ENOENT) nor a new one (EBUSY): it fails. Hence: **close an id only once the inode's
   last passthrough open is released**. After that the inode is neutral again and a new id
   may be used.
4. **FOPEN_DIRECT_IO without PASSTHROUGH takes no io mode** (``fuse_file_io_open`` returns
   early) but still fails while the inode is in passthrough mode (rule 1 check comes first);
   its first shared mmap enters caching mode. **FOPEN_PASSTHROUGH accepts only
   FOPEN_PASSTHROUGH_MASK** (DIRECT_IO, PARALLEL_DIRECT_WRITES, NOFLUSH): KEEP_CACHE with it is
   EINVAL -> EIO (the session drops keep_cache from passthrough answers).
5. **Answering OPEN with ENOSYS sets ``fc->no_open`` for the whole connection**: the kernel
   never sends OPEN again, files have no io mode, and passthrough is gone for the life of the
   mount. A view choosing no_open gives up passthrough.
6. Passthrough exists only if INIT agreed FUSE_PASSTHROUGH with ``max_stack_depth`` 1..2 and no
   writeback cache; BACKING_OPEN needs CAP_SYS_ADMIN and fails EPERM otherwise, and EINVAL
   when the backing file's filesystem is stacked deeper than ``max_stack_depth`` allows.
7. Backing ids live in the connection (``fc->backing_files_map``) until closed or the
   connection ends; a worker restart does not close them, and neither does SIGKILL while a
   holder keeps the descriptor. Ids are allocated cyclically from 1 (``idr_alloc_cyclic`` in
   ``fuse_backing_id_alloc``): a closed id's number comes back only after ~2^31 registrations,
   so a stale id almost always fails the open (ENOENT -> EIO) - but after the wrap it would
   name another file, so the log must never hold an id the kernel closed.

What :class:`BackingTable` does with that: per nodeid the backing id in use and the open
handles of each kind; :meth:`BackingTable.open` answers passthrough with the inode's current id
(registering one only when the inode is neutral), caching when the inode has caching opens.
It persists every change to an append-only log (a shared mapping of a tmpfs file) **before**
the answer that depends on it, so a restarted worker reuses the same ids:

* an open is logged before its reply: a crash after logging but before replying leaves a
  record the kernel never saw (the inode keeps that mode and its id stays open: the safe
  direction); a crash before logging means the reply was never sent;
* handles are unique serials and RELEASE removes one by handle, so a RELEASE the kernel
  resends after a crash is idempotent (a count could be decremented twice);
* closing an id is logged before the ioctl: a crash between leaves the id open in the kernel,
  unused (safe); the reverse order could hand out an id the kernel closed (EIO, or after the
  id numbers wrap, another file's bytes).

**Ids are kept after the last release** when the owner sets ``retain`` (the view keeps up to
4096, least recently released closed first; with 0 an id is closed at its last release): a loader opens each file once per epoch, so closing the id at every last release
made every open pay the registration again. A kept id holds the kernel's reference to the cache
file, so whoever owns the file must say when it changes or goes: the next open of an inode with
a kept id and no passthrough open asks ``still()`` (the view: is the cache file still the
verified one that was registered?) and closes the id if not; :meth:`BackingTable.drop` closes
it at once when the store evicts the file (its space comes back only when the kernel lets go).
A restarted worker closes every kept id at start (``_close_unused``), as before: the log and its
crash rules are unchanged, a kept id is just a ``b`` record without its ``c`` yet.

Measured cost (``bench/fusell_bench.py --table-cost``, 2 loaded cores): an open+release pair
costs 6-8 us of Python bookkeeping (two 32-byte records stored into the mapping, no system
call; with two ``os.write`` calls per pair instead it was 13-22 us), 8-15 us measured on a
live connection; an open that must register the backing file (os.open, BACKING_OPEN, and at
its release BACKING_CLOSE) 40-49 us: the cost every small-file open paid before ids were kept.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .connection import Connection

log = logging.getLogger(__name__)

PASSTHROUGH, CACHING, DIRECT = "P", "C", "D"


@dataclass(slots=True)
class Choice:
    """How to answer one OPEN: ``Opened(fh=choice.fh, backing_id=choice.backing_id, ...)``."""

    fh: int
    backing_id: int | None
    kind: str  # PASSTHROUGH, CACHING or DIRECT


@dataclass(slots=True)
class _Inode:
    backing_id: int | None = None
    fhs: dict[int, str] = field(default_factory=dict)  # fh -> kind
    passthrough: int = 0
    caching: int = 0

    def add(self, fh: int, kind: str) -> None:
        self.fhs[fh] = kind
        if kind == PASSTHROUGH:
            self.passthrough += 1
        elif kind == CACHING:
            self.caching += 1

    def remove(self, fh: int) -> None:
        kind = self.fhs.pop(fh, None)
        if kind == PASSTHROUGH:
            self.passthrough -= 1
        elif kind == CACHING:
            self.caching -= 1


# The log: fixed 32-byte records in a MAP_SHARED mapping of a tmpfs file. A store into the
# mapping is in the page cache the moment it is made, so a SIGKILLed process loses nothing it
# stored, and an open costs no system call (two os.write calls per open+release cost 10-20 us,
# as much as the FUSE round trip). A record's first byte (its op) is stored last: a process
# killed in the middle of storing one leaves a zero op, read back as "not written".
_REC = __import__("struct").Struct("=BBxxxxxxQQq")  # op kind pad nodeid fh backing_id
_OPS = {"o": 1, "r": 2, "b": 3, "c": 4, "s": 5}
_OPNAMES = {v: k for k, v in _OPS.items()}
_KINDS = {PASSTHROUGH: 1, CACHING: 2, DIRECT: 3}
_KINDNAMES = {v: k for k, v in _KINDS.items()}


class BackingTable:
    """Per-inode io mode and backing id, persisted to ``path`` (put it on tmpfs)."""

    SIZE = 1 << 20  # records of 32 bytes: compacted when full

    def __init__(self, path: str | os.PathLike, conn: Connection, retain: int = 0,
                 on_close: Callable[[int], None] | None = None):
        self.path = Path(path)
        self.conn = conn
        #: Inodes whose id is kept after their last passthrough release (module docstring); 0:
        #: closed at the last release. Only for an owner that passes ``still`` to ``open``.
        self.retain = retain
        self._retained: OrderedDict[int, None] = OrderedDict()
        #: Inodes whose file went while passthrough opens still used their id: closed at the last.
        self._doomed: set[int] = set()
        #: Told the node id whenever an id is closed (called under the table's lock).
        self.on_close = on_close
        self._lock = threading.Lock()
        self._inodes: dict[int, _Inode] = {}
        self._fh_node: dict[int, int] = {}
        self._next_fh = 1
        self._mm: mmap.mmap | None = None
        self._pos = 0
        self._load()
        self._rewrite()  # a restart starts from a compact log
        self._close_unused()

    # -- the API --------------------------------------------------------------------------
    @property
    def passthrough_enabled(self) -> bool:
        return bool(self.conn.state and self.conn.state.passthrough)

    def open(self, nodeid: int, backing: Callable[[], int | None] | None,
             direct_io: bool = False, still: Callable[[], bool] | None = None) -> Choice:
        """Choose how to answer an OPEN of ``nodeid``. ``backing`` returns a fresh descriptor of
        the file's whole, verified cache file (closed here after registering it), or is None
        when the file cannot be passed through now. ``direct_io``: the caller wants an open
        that takes no io mode (rule 4) when not passing through. ``still``: whether the file a
        kept id was registered for is still the one to serve (without it, a kept id is closed
        and the file registered again)."""
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                ino = self._inodes[nodeid] = _Inode()
            fh = self._next_fh
            self._next_fh += 1
            if ino.backing_id is not None and not ino.passthrough:  # kept after its last release
                self._retained.pop(nodeid, None)
                if still is None or not still():
                    self._close(nodeid, ino)
            if ino.backing_id is not None:
                kind, bid = PASSTHROUGH, ino.backing_id
            elif backing is not None and not ino.caching and self.passthrough_enabled:
                bid = self._register(nodeid, ino, backing)
                kind = PASSTHROUGH if bid is not None else (DIRECT if direct_io else CACHING)
            else:
                kind, bid = (DIRECT if direct_io else CACHING), None
            self._log("o", nodeid, fh, bid or 0, kind)
            ino.add(fh, kind)
            self._fh_node[fh] = nodeid
            return Choice(fh, bid, kind)

    def release(self, nodeid: int, fh: int) -> None:
        """Forget one open; closes the inode's backing id after its last passthrough open.
        Idempotent (a RELEASE resent after a restart finds nothing)."""
        with self._lock:
            node = self._fh_node.pop(fh, None)
            if node is None:
                return
            ino = self._inodes[node]
            self._log("r", node, fh, 0)
            ino.remove(fh)
            if ino.backing_id is not None and not ino.passthrough:
                if self.retain > 0 and node not in self._doomed:
                    self._retained[node] = None
                    self._retained.move_to_end(node)
                    while len(self._retained) > self.retain:
                        self._drop_locked(next(iter(self._retained)))
                else:
                    self._close(node, ino)
            if not ino.fhs and ino.backing_id is None:
                del self._inodes[node]

    def drop(self, nodeid: int) -> None:
        """The inode's cache file went (evicted, replaced): close a kept id now, so the kernel
        lets go of the file. An id still in use by passthrough opens is closed at their last
        release instead (they keep reading the file they opened)."""
        with self._lock:
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

    def mode(self, nodeid: int) -> tuple[int | None, int, int]:
        """(backing id, passthrough opens, caching opens) of an inode, e.g. for eviction."""
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                return None, 0, 0
            return ino.backing_id, ino.passthrough, ino.caching

    def is_open(self, nodeid: int) -> bool:
        with self._lock:
            ino = self._inodes.get(nodeid)
            return bool(ino and ino.fhs)

    def close(self) -> None:
        with self._lock:
            if self._mm is not None:
                self._mm.close()
                self._mm = None

    # -- internals ------------------------------------------------------------------------
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

    def _log(self, op: str, nodeid: int, fh: int, bid: int, kind: str = "") -> None:
        if self._pos + _REC.size > self.SIZE:
            self._rewrite()
        mm, pos = self._mm, self._pos
        rec = _REC.pack(_OPS[op], _KINDS.get(kind, 0), nodeid, fh, bid)
        mm[pos + 1:pos + _REC.size] = rec[1:]
        mm[pos] = rec[0]  # last: the record exists from here on
        self._pos = pos + _REC.size

    def _load(self) -> None:
        for rec in read_log(self.path):
            self._apply(*rec)

    def _apply(self, op: str, nodeid: int, fh: int, bid: int, kind: str) -> None:
        if op == "s":
            self._next_fh = max(self._next_fh, fh)
        elif op == "o":
            ino = self._inodes.setdefault(nodeid, _Inode())
            ino.add(fh, kind)
            self._fh_node[fh] = nodeid
            self._next_fh = max(self._next_fh, fh + 1)
            if kind == PASSTHROUGH:
                ino.backing_id = bid
        elif op == "r":
            node = self._fh_node.pop(fh, None)
            if node is not None:
                self._inodes[node].remove(fh)
        elif op == "b":
            self._inodes.setdefault(nodeid, _Inode()).backing_id = bid
        elif op == "c":
            ino = self._inodes.get(nodeid)
            if ino is not None and ino.backing_id == bid:
                ino.backing_id = None

    def _rewrite(self) -> None:
        """Write the live state as a fresh log (beside, then renamed over) and map it."""
        snap = [("s", 0, self._next_fh, 0, "")]
        for nodeid, ino in self._inodes.items():
            if ino.backing_id is not None:
                snap.append(("b", nodeid, 0, ino.backing_id, ""))
            for fh, kind in ino.fhs.items():
                snap.append(("o", nodeid, fh, ino.backing_id or 0, kind))
        size = max(self.SIZE, 2 * len(snap) * _REC.size)
        self.SIZE = size
        buf = bytearray(size)
        for i, (op, nodeid, fh, bid, kind) in enumerate(snap):
            _REC.pack_into(buf, i * _REC.size, _OPS[op], _KINDS.get(kind, 0), nodeid, fh, bid)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, buf)
            os.replace(tmp, self.path)  # the old log stays whole until this instant
            old = self._mm
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if old is not None:
                old.close()
        finally:
            os.close(fd)
        self._pos = len(snap) * _REC.size


def read_log(path: str | os.PathLike) -> list[tuple[str, int, int, int, str]]:
    """A table's log as (op, nodeid, fh, backing_id, kind) records, oldest first; op is one
    of o(pen) r(elease) b(acking opened) c(losed) s(erial start)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return list(_read_records(data, len(data)))


def _read_records(data, end: int):
    for off in range(0, end - _REC.size + 1, _REC.size):
        op, kind, nodeid, fh, bid = _REC.unpack_from(data, off)
        if op == 0:
            return
        name = _OPNAMES.get(op)
        if name is None:
            log.warning("ignoring a damaged backing table record at %d", off)
            continue
        yield name, nodeid, fh, bid, _KINDNAMES.get(kind, "")
