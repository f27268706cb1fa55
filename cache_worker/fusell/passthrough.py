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
The table is put together from one part per job: the open decision here,
:mod:`.passthrough_ids` (registering and closing ids, and keeping them after the last release)
and :mod:`.passthrough_log` (the log that carries it all across restarts, and its crash rules).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .connection import Connection
from .iomode import CACHING, DIRECT, PASSTHROUGH
from .iomode import Inode as _Inode
from .passthrough_ids import BackingIds
from .passthrough_log import BackingLog
from .passthrough_native import DEFAULT_ARMS, NativeArms


@dataclass(slots=True)
class Choice:
    """How to answer one OPEN: ``Opened(fh=choice.fh, backing_id=choice.backing_id, ...)``."""

    fh: int
    backing_id: int | None
    kind: str  # PASSTHROUGH, CACHING or DIRECT


class BackingTable(BackingIds, BackingLog, NativeArms):
    """Per-inode io mode and backing id, persisted to ``path`` (put it on tmpfs)."""

    def __init__(self, path: str | os.PathLike, conn: Connection, retain: int = 0,
                 on_close: Callable[[int], None] | None = None, arms: int = DEFAULT_ARMS):
        self.path = Path(path)
        self.conn = conn
        #: Inodes whose id is kept after their last passthrough release (passthrough_ids.py); 0:
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
        self._counts: mmap.mmap | None = None
        self._pos = 0
        self._load()
        self._rewrite()  # a restart starts from a compact log
        self._close_unused()
        # Ids still in use were registered by a process that is gone: their files cannot be
        # vouched for here (nothing remembers what was registered), so they are closed at their
        # last release instead of kept, and the next open registers the file again.
        self._doomed.update(n for n, ino in self._inodes.items() if ino.backing_id is not None)
        self._open_counts(arms)

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
            self._release_locked(nodeid, fh)

    def _release_locked(self, nodeid: int, fh: int) -> None:
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
            self._close_counts()
            if self._mm is not None:
                self._mm.close()
                self._mm = None
