"""Verified chunks of remote objects on local disk, one file per object, with a capacity and
LRU eviction.

The store is one class, :class:`ChunkStore`, put together from one part per job, each in its own
module with the explanations and measurements of that job:

- :mod:`.store_layout`: object ids, chunk names and geometry, the file-per-object layout;
- :mod:`.store_record`: the record of chunks in ``chunks.db``, and recency;
- :mod:`.store_trust`: what this process verified, under which file signature and boot;
- :mod:`.store_read`: reads and CRC checks, safe against a racing eviction;
- :mod:`.store_write`: fills, the crash rule, renaming a checked twin into place;
- :mod:`.store_evict`: LRU eviction, punching and unlinking, dropping corrupt chunks;
- :mod:`.store_room`: a disk that fills or fails under a running worker;
- :mod:`.store_migrate`: start-up recovery and caches of the older layout;
- :mod:`.store_pins`: pins and external bytes of direct trees;
- :mod:`.store_backing`: backing files for FUSE passthrough.

This module holds the state they share (set up in ``__init__``), the per-object locks and the
hooks. No part has a lock of its own: they share ``_lock`` and the per-object locks defined
here.

With ``private`` (a view without ``allow_other``) directories are 0700 and files 0600: the cache
holds the same bytes as the view and must not be readable by users the view refuses.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .chunk_db import open_record
from .store_backing import StoreBacking
from .store_errors import CacheFull, CorruptChunk
from .store_evict import STRIPES as _STRIPES
from .store_evict import StoreEviction, punch_hole
from .store_layout import ChunkId, StorePaths, chunk_of, object_id
from .store_migrate import StoreStartup
from .store_pins import StorePins
from .store_read import StoreReads
from .store_record import StoreRecord
from .store_room import StoreRoom
from .store_trust import Signature, boot_id
from .store_trust import Trust as _Trust
from .store_write import StoreWrites

__all__ = ["CacheFull", "ChunkId", "ChunkStore", "CorruptChunk", "Signature", "boot_id", "chunk_of", "object_id",
           "punch_hole"]


class ChunkStore(StoreReads, StoreWrites, StoreEviction, StoreBacking, StorePins, StoreRecord, StoreRoom,
                 StoreStartup, StorePaths):
    """Verified chunks of remote objects on local disk (module docstring); the methods are in
    the parts named there."""

    def __init__(self, root: Path, capacity: int, private: bool = False) -> None:
        self.root = root
        self.capacity = capacity
        self.private = private
        #: Modes of what the store creates, for the view's privacy (module docstring).
        self.dir_mode = 0o700 if private else 0o755
        self.file_mode = 0o600 if private else 0o644
        self._data = root / "data"
        self._data_s = os.fspath(self._data)
        self._tmp = root / "tmp"
        for path in (root, self._data, self._tmp):
            path.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            if private and os.stat(path).st_mode & 0o077:  # made by a mount that allowed others
                os.chmod(path, self.dir_mode)
        self._lock = threading.Lock()
        #: Per-object locks: one writer (fill, punch, drop) of an object file at a time.
        self._object_locks: dict[str, list] = {}
        self._object_guard = threading.Lock()
        #: Space promised to fills in progress: concurrent fills must not overshoot together.
        self._reserved = 0
        self._space_freed = threading.Condition(self._lock)
        self._db, state, message = open_record(root / "chunks.db", self.file_mode)
        #: Why the record was replaced or cannot be used (kept until the worker restarts).
        self._record_problem = message
        #: The record cannot be written (read-only or in memory): store nothing, touch no file.
        self._read_through = state in ("read-only", "memory")
        #: Why fills read through for want of space; None once the disk has room again.
        self._full: str | None = None
        self._full_retry_at = 0.0
        #: Chunks whose files are gone but whose records could not be deleted (disk full).
        self._gone: set[str] = set()
        #: Chunks a check dropped (``discard``) and not stored since. Updated with the records,
        #: under the same lock, so whoever finds such a chunk missing also finds it here: a
        #: direct tree's build fetches it again (tree_build.py) rather than failing on it.
        self._discarded: set[str] = set()
        #: Bytes held outside chunk files but inside the capacity: large files a direct tree
        #: assembled from their chunks.
        self.external_bytes = 0
        #: Called with a chunk's name when it was found corrupt and dropped (the tree unlinks
        #: its entry and relinks a refetched copy).
        self.on_discard: Callable[[str], None] | None = None
        #: Called with (chunk names, True: now cached / False: no longer) whenever the set of
        #: cached chunks changes, under the store's lock: it must be quick and must not call
        #: into the store (completeness.py turns it into the "fully cached" event).
        self.on_change: Callable[[Iterable[str], bool], None] | None = None
        #: Told an object's id when its file is unlinked (evicted, dropped), under the store's
        #: lock: the view closes a backing id it kept for the file (fs.py), so the kernel lets
        #: go of it. Must not block or take other locks.
        self.on_object_gone: Callable[[str], None] | None = None
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        #: Per object file: the chunks this process checked against their CRC, under which
        #: signature; others (or a changed file) are checked on use.
        self._trust: dict[str, _Trust] = {}
        self._epochs = [0] * _STRIPES
        self._boot = boot_id()
        self._punch_failed = False
        if state == "rebuilt":
            self._drop_all_files()
        if not self._read_through:
            self._recover()
        row = self._query("SELECT COALESCE(SUM(size), 0) FROM chunks")
        self.used_bytes: int = row[0] if row else 0

    @property
    def problem(self) -> str | None:
        """Why the store is not caching as it should (for ``degraded``), or None."""
        return self._record_problem or self._full

    @contextmanager
    def _object_lock(self, oid: str, blocking: bool = True) -> Iterator[bool]:
        """One writer of an object file at a time; yields False if not ``blocking`` and busy."""
        with self._object_guard:
            # Re-entrant: a fill evicting for room may evict other chunks of its own object
            # (an object larger than the cache, read sequentially), never the one it writes.
            entry = self._object_locks.setdefault(oid, [threading.RLock(), 0])
            entry[1] += 1
        got = entry[0].acquire(blocking)
        try:
            yield got
        finally:
            if got:
                entry[0].release()
            with self._object_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._object_locks.pop(oid, None)

    def close(self) -> None:
        """Under the lock: a background check still reading (verify.py does not wait for it)
        then gets an error from the closed record, not a crash of the process in SQLite."""
        with self._lock:
            self._flush_touches_locked()
            self._db.close()
