"""The log that lets :class:`~.passthrough.BackingTable` survive worker restarts with the
connection.

The table persists every change to an append-only log (a shared mapping of a tmpfs file)
**before** the answer that depends on it, so a restarted worker reuses the same ids:

* an open is logged before its reply: a crash after logging but before replying leaves a
  record the kernel never saw (the inode keeps that mode and its id stays open: the safe
  direction); a crash before logging means the reply was never sent;
* handles are unique serials and RELEASE removes one by handle, so a RELEASE the kernel
  resends after a crash is idempotent (a count could be decremented twice);
* closing an id is logged before the ioctl: a crash between leaves the id open in the kernel,
  unused (safe); the reverse order could hand out an id the kernel closed (EIO, or after the
  id numbers wrap, another file's bytes).

Measured cost (``bench/fusell_bench.py --table-cost``, 2 loaded cores): an open+release pair
costs 6-8 us of Python bookkeeping (two 32-byte records stored into the mapping, no system
call; with two ``os.write`` calls per pair instead it was 13-22 us), 8-15 us measured on a
live connection.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct

from .iomode import CACHING, DIRECT, PASSTHROUGH
from .iomode import Inode as _Inode
from .passthrough_native import ARM_FH

log = logging.getLogger("datahoard.cache_worker.fusell.passthrough")  # one log for the table, as before the split

# The log: fixed 32-byte records in a MAP_SHARED mapping of a tmpfs file. A store into the
# mapping is in the page cache the moment it is made, so a SIGKILLed process loses nothing it
# stored, and an open costs no system call (two os.write calls per open+release cost 10-20 us,
# as much as the FUSE round trip). A record's first byte (its op) is stored last: a process
# killed in the middle of storing one leaves a zero op, read back as "not written".
_REC = struct.Struct("=BBxxxxxxQQq")  # op kind pad nodeid fh backing_id
_OPS = {"o": 1, "r": 2, "b": 3, "c": 4, "s": 5}
_OPNAMES = {v: k for k, v in _OPS.items()}
_KINDS = {PASSTHROUGH: 1, CACHING: 2, DIRECT: 3}
_KINDNAMES = {v: k for k, v in _KINDS.items()}


class BackingLog:
    """Writing, replaying and compacting the log.
    A part of :class:`.passthrough.BackingTable`, which sets up the state in ``__init__``."""

    SIZE = 1 << 20  # records of 32 bytes: compacted when full

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
            if fh < ARM_FH:  # an arm's handle is its slot's (passthrough_native.py)
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
