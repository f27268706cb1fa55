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
   holder keeps the descriptor. The kernel reuses a closed id number for the next BACKING_OPEN.

What :class:`BackingTable` does with that: per nodeid the backing id in use and the open
handles of each kind; :meth:`BackingTable.open` answers passthrough with the inode's current id
(registering one only when the inode is neutral), caching when the inode has caching opens.
It persists every change to an append-only log (on tmpfs) **before** the answer that depends on
it, so a restarted worker reuses the same ids:

* an open is logged before its reply: a crash after logging but before replying leaves a
  record the kernel never saw (the inode keeps that mode and its id stays open: the safe
  direction); a crash before logging means the reply was never sent;
* handles are unique serials and RELEASE removes one by handle, so a RELEASE the kernel
  resends after a crash is idempotent (a count could be decremented twice);
* closing an id is logged before the ioctl: a crash between leaves the id open in the kernel,
  unused (safe); the reverse order could hand out an id the kernel closed and re-issued for
  another file - wrong bytes.

Measured cost per open: see :data:`MEASURED` (tests/cache_worker/test_fusell.py prints it).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .connection import Connection

log = logging.getLogger(__name__)

PASSTHROUGH, CACHING, DIRECT = "P", "C", "D"
MEASURED = "open+release (caching, or passthrough on an inode already passed through): ~see test"


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

    def count(self, kind: str) -> int:
        return sum(1 for k in self.fhs.values() if k == kind)


class BackingTable:
    """Per-inode io mode and backing id, persisted to ``path`` (put it on tmpfs)."""

    COMPACT_AFTER = 4096

    def __init__(self, path: str | os.PathLike, conn: Connection):
        self.path = Path(path)
        self.conn = conn
        self._lock = threading.Lock()
        self._inodes: dict[int, _Inode] = {}
        self._fh_node: dict[int, int] = {}
        self._next_fh = 1
        self._records = 0
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._close_unused()

    # -- the API --------------------------------------------------------------------------
    @property
    def passthrough_enabled(self) -> bool:
        return bool(self.conn.state and self.conn.state.passthrough)

    def open(self, nodeid: int, backing: Callable[[], int | None] | None,
             direct_io: bool = False) -> Choice:
        """Choose how to answer an OPEN of ``nodeid``. ``backing`` returns a fresh descriptor of
        the file's whole, verified cache file (closed here after registering it), or is None
        when the file cannot be passed through now. ``direct_io``: the caller wants an open
        that takes no io mode (rule 4) when not passing through."""
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                ino = self._inodes[nodeid] = _Inode()
            fh = self._next_fh
            self._next_fh += 1
            if ino.backing_id is not None:
                kind, bid = PASSTHROUGH, ino.backing_id
            elif backing is not None and self.passthrough_enabled and not ino.count(CACHING):
                bid = self._register(nodeid, ino, backing)
                kind = PASSTHROUGH if bid is not None else (DIRECT if direct_io else CACHING)
            else:
                kind, bid = (DIRECT if direct_io else CACHING), None
            self._log(f"o {fh} {nodeid} {kind} {bid or 0}")
            ino.fhs[fh] = kind
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
            ino.fhs.pop(fh, None)
            self._log(f"r {fh}")
            if ino.backing_id is not None and not ino.count(PASSTHROUGH):
                self._close(node, ino)
            if not ino.fhs and ino.backing_id is None:
                del self._inodes[node]
            self._maybe_compact()

    def mode(self, nodeid: int) -> tuple[int | None, int, int]:
        """(backing id, passthrough opens, caching opens) of an inode, e.g. for eviction."""
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                return None, 0, 0
            return ino.backing_id, ino.count(PASSTHROUGH), ino.count(CACHING)

    def is_open(self, nodeid: int) -> bool:
        with self._lock:
            ino = self._inodes.get(nodeid)
            return bool(ino and ino.fhs)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        try:
            self._log(f"b {nodeid} {bid}")
        except OSError:
            self.conn.backing_close(bid)
            raise
        ino.backing_id = bid
        return bid

    def _close(self, nodeid: int, ino: _Inode) -> None:
        bid = ino.backing_id
        self._log(f"c {nodeid} {bid}")  # before the ioctl: never reuse an id the kernel closed
        ino.backing_id = None
        try:
            self.conn.backing_close(bid)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("closing backing id %d failed: %s", bid, e)

    def _close_unused(self) -> None:
        """Ids registered by a process that died before (or after) using them."""
        with self._lock:
            for nodeid, ino in list(self._inodes.items()):
                if ino.backing_id is not None and not ino.count(PASSTHROUGH):
                    self._close(nodeid, ino)
                if not ino.fhs and ino.backing_id is None:
                    del self._inodes[nodeid]

    def _log(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())
        self._records += 1

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        for line in text.splitlines():
            parts = line.split()
            try:
                self._apply(parts)
            except (ValueError, IndexError, KeyError):
                log.warning("ignoring a damaged line in %s: %r", self.path, line)
            self._records += 1

    def _apply(self, p: list[str]) -> None:
        op = p[0]
        if op == "s":
            self._next_fh = max(self._next_fh, int(p[1]))
        elif op == "o":
            fh, nodeid, kind, bid = int(p[1]), int(p[2]), p[3], int(p[4])
            ino = self._inodes.setdefault(nodeid, _Inode())
            ino.fhs[fh] = kind
            self._fh_node[fh] = nodeid
            self._next_fh = max(self._next_fh, fh + 1)
            if kind == PASSTHROUGH:
                ino.backing_id = bid
        elif op == "r":
            nodeid = self._fh_node.pop(int(p[1]), None)
            if nodeid is not None:
                ino = self._inodes[nodeid]
                ino.fhs.pop(int(p[1]), None)
        elif op == "b":
            self._inodes.setdefault(int(p[1]), _Inode()).backing_id = int(p[2])
        elif op == "c":
            ino = self._inodes.get(int(p[1]))
            if ino is not None and ino.backing_id == int(p[2]):
                ino.backing_id = None
        else:
            raise ValueError(op)

    def _maybe_compact(self) -> None:
        live = len(self._fh_node) + len(self._inodes)
        if self._records < self.COMPACT_AFTER + 4 * live:
            return
        lines = [f"s {self._next_fh}"]
        for nodeid, ino in self._inodes.items():
            if ino.backing_id is not None:
                lines.append(f"b {nodeid} {ino.backing_id}")
            for fh, kind in ino.fhs.items():
                lines.append(f"o {fh} {nodeid} {kind} {ino.backing_id or 0}")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._records = len(lines)
