"""Verified chunks of remote objects on local disk, with a capacity and LRU eviction.

Every cached piece of data is one *chunk* file: a small object is a single chunk holding the
whole object, a large object is split into fixed-size chunks so a random read into a 10 GB
shard fetches a few MiB, not 10 GB. A chunk file is written under ``tmp/`` and renamed into
place, then recorded (size, CRC32, last use) in ``chunks.db``; a crash at any point leaves
either no record (the orphan file is deleted at start-up) or a complete file.

Nothing is fsync'ed: a process crash cannot lose renamed data, and after a machine crash every
chunk is checked against its CRC the first time it is served by a new process, so a torn or
corrupt file is never served; it is dropped and refetched. Chunks are named by a hash of the
object key and its ETag, so a changed object never reuses old data.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: Recency updates are batched: a read must not cost a database write.
_TOUCH_FLUSH_SECONDS = 5.0


class CacheFull(Exception):
    """The chunk cannot be stored: larger than the capacity, or the disk is full."""


class CorruptChunk(Exception):
    """A chunk file failed its check; it has been dropped and must be refetched."""


@dataclass(frozen=True, slots=True)
class ChunkId:
    object_id: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.object_id}.{self.index}"


def object_id(key: str, etag: str, size: int) -> str:
    """Stable name of one version of one object."""
    return hashlib.sha256(f"{key}\0{etag}\0{size}".encode("utf-8", "surrogateescape")).hexdigest()[:40]


class ChunkStore:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._data = root / "data"
        self._tmp = root / "tmp"
        self._data.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        #: Space promised to fills in progress: concurrent fills must not overshoot together.
        self._reserved = 0
        self._space_freed = threading.Condition(self._lock)
        self._db = sqlite3.connect(root / "chunks.db", check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE IF NOT EXISTS chunks (name TEXT PRIMARY KEY, size INTEGER NOT NULL,"
            " crc INTEGER NOT NULL, used REAL NOT NULL) WITHOUT ROWID;"
            "CREATE INDEX IF NOT EXISTS chunks_used ON chunks (used);"
            # Chunks hard-linked into a direct tree (cache_worker.tree): never evicted, because
            # evicting a linked chunk frees no space and would make the tree disagree with us.
            "CREATE TABLE IF NOT EXISTS pins (name TEXT NOT NULL, tree TEXT NOT NULL, path TEXT NOT NULL,"
            " PRIMARY KEY (name, tree)) WITHOUT ROWID;"
        )
        #: Bytes held outside chunk files but inside the capacity: large files a direct tree
        #: assembled from their chunks.
        self.external_bytes = 0
        #: Called with a chunk's name when it was found corrupt and dropped (the tree unlinks
        #: its entry and relinks a refetched copy).
        self.on_discard: Callable[[str], None] | None = None
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        #: Chunks checked against their CRC by this process; others are checked on first use.
        self._verified: set[str] = set()
        self._recover()
        self.used_bytes: int = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]

    # -- paths -----------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self._data / name[:2] / name

    def path(self, name: str) -> Path:
        """Where chunk ``name`` lives (it may not exist)."""
        return self._path(name)

    def _recover(self) -> None:
        """Drop leftovers of a crash: temp files, records without files, files without records."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        known = {name for (name,) in self._db.execute("SELECT name FROM chunks")}
        on_disk: set[str] = set()
        for sub in self._data.iterdir():
            for entry in os.scandir(sub):
                if entry.name in known:
                    on_disk.add(entry.name)
                else:
                    os.unlink(entry.path)
        missing = known - on_disk
        if missing:
            self._db.executemany("DELETE FROM chunks WHERE name = ?", [(n,) for n in missing])
        if missing or len(known) != len(on_disk):
            log.info("cache recovery: %d chunks kept, %d records dropped", len(on_disk), len(missing))

    # -- lookups ---------------------------------------------------------------------------
    def contains(self, chunk: ChunkId) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM chunks WHERE name = ?", (chunk.name,)).fetchone()
        return row is not None

    def read(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes of a cached chunk, or None if it is not cached (or was found corrupt)."""
        name = chunk.name
        if name not in self._verified and not self._verify(name):
            return None
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:  # evicted between the check and the open
            self._verified.discard(name)
            return None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._touch(name)
        return data

    def verify(self, name: str) -> bool:
        """True if chunk ``name`` is cached and matches its CRC (checked once per process);
        a chunk that fails is dropped (and reported through ``on_discard``)."""
        return name in self._verified or self._verify(name)

    def record(self, name: str) -> tuple[int, int] | None:
        """(size, CRC32) of a cached chunk, or None."""
        with self._lock:
            return self._db.execute("SELECT size, crc FROM chunks WHERE name = ?", (name,)).fetchone()

    def _verify(self, name: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT size, crc FROM chunks WHERE name = ?", (name,)).fetchone()
        if row is None:
            return False
        size, crc = row
        try:
            data = self._path(name).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or len(data) != size or zlib.crc32(data) != crc:
            log.error("cached chunk %s failed verification; dropping it and refetching", name)
            self.discard(name)
            return False
        self._verified.add(name)
        return True

    # -- writes ----------------------------------------------------------------------------
    def put(self, chunk: ChunkId, data: bytes) -> None:
        """Store a verified chunk atomically, evicting least-recently-used chunks for room.

        Raises CacheFull if it cannot be stored; the caller then serves ``data`` uncached.
        """
        size = len(data)
        if size > self.capacity:
            raise CacheFull(f"chunk of {size} bytes exceeds the cache capacity of {self.capacity}")
        name = chunk.name
        self._reserve(size)
        tmp = self._tmp / f"{name}.{threading.get_ident()}"
        final = self._path(name)
        try:
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._unreserve(size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._make_room(size * 4, force=True)
                raise CacheFull(f"cache disk is full at {self.root}") from exc
            raise
        now = time.time()
        with self._lock:
            previous = self._db.execute("SELECT size FROM chunks WHERE name = ?", (name,)).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?)", (name, size, zlib.crc32(data), now)
            )
            self.used_bytes += size - (previous[0] if previous else 0)
            self._reserved -= size
            self._space_freed.notify_all()
        self._verified.add(name)

    def _reserve(self, size: int) -> None:
        """Evict for room and hold ``size`` bytes until the fill is recorded or abandoned.

        When fills in progress hold the rest of the capacity, wait for them (bounded) rather
        than overshoot; if they still hold it, fail over to reading through.
        """
        deadline = time.monotonic() + 30
        with self._lock:
            while True:
                self._evict_locked(size)
                if self.used_bytes + self.external_bytes + self._reserved + size <= self.capacity or not self._reserved:
                    self._reserved += size
                    return
                if not self._space_freed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise CacheFull("the cache is full of fills in progress")

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._reserved -= size
            self._space_freed.notify_all()

    def discard(self, name: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT size FROM chunks WHERE name = ?", (name,)).fetchone()
            self._db.execute("DELETE FROM chunks WHERE name = ?", (name,))
            if row:
                self.used_bytes -= row[0]
            self._touched.pop(name, None)
        self._verified.discard(name)
        self._path(name).unlink(missing_ok=True)
        if self.on_discard is not None:
            self.on_discard(name)

    # -- pins (direct trees) ---------------------------------------------------------------
    def pin(self, tree: str, rows: Iterable[tuple[str, str]]) -> None:
        """Exempt chunks from eviction for ``tree``: rows of (chunk name, path in the tree)."""
        rows = [(n, tree, p) for n, p in rows]
        if rows:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany("INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", rows)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    def unpin(self, tree: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pins WHERE tree = ?", (tree,))

    def pinned_trees(self) -> set[str]:
        with self._lock:
            return {t for (t,) in self._db.execute("SELECT DISTINCT tree FROM pins")}

    def pinned_paths(self, name: str) -> list[tuple[str, str]]:
        """(tree, path) of every tree entry linked to chunk ``name``."""
        with self._lock:
            return self._db.execute("SELECT tree, path FROM pins WHERE name = ?", (name,)).fetchall()

    def reserve_external(self, size: int) -> bool:
        """Count ``size`` more bytes held outside chunk files against the capacity, evicting
        unpinned chunks for room; False (nothing reserved) if they do not fit."""
        with self._lock:
            evictable = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM chunks WHERE name NOT IN (SELECT name FROM pins)"
            ).fetchone()[0]
            if self.used_bytes - evictable + self.external_bytes + self._reserved + size > self.capacity:
                return False  # would not fit even after evicting everything evictable: evict nothing
            self._evict_locked(size)
            if self.used_bytes + self.external_bytes + self._reserved + size > self.capacity:
                return False
            self.external_bytes += size
            return True

    def release_external(self, size: int) -> None:
        with self._lock:
            self.external_bytes = max(0, self.external_bytes - size)
            self._space_freed.notify_all()

    def _touch(self, name: str) -> None:
        now = time.time()
        with self._lock:
            self._touched[name] = now
            if time.monotonic() - self._last_flush > _TOUCH_FLUSH_SECONDS:
                self._flush_touches_locked()

    def _flush_touches_locked(self) -> None:
        if self._touched:
            self._db.executemany(
                "UPDATE chunks SET used = ? WHERE name = ?", [(t, n) for n, t in self._touched.items()]
            )
            self._touched.clear()
        self._last_flush = time.monotonic()

    def _make_room(self, incoming: int, force: bool = False) -> None:
        """Evict least-recently-used chunks until ``incoming`` more bytes fit (or, with
        ``force``, until ``incoming`` bytes were freed: the disk filled before the capacity)."""
        with self._lock:
            self._evict_locked(incoming, force)

    def _evict_locked(self, incoming: int, force: bool = False) -> None:
        if not force and self.used_bytes + self.external_bytes + self._reserved + incoming <= self.capacity:
            return
        self._flush_touches_locked()
        target = (max(0, self.used_bytes - incoming) if force
                  else self.capacity - self.external_bytes - self._reserved - incoming)
        victims = []
        freed = 0
        for name, size in self._db.execute(
            "SELECT name, size FROM chunks WHERE name NOT IN (SELECT name FROM pins) ORDER BY used"
        ):
            if self.used_bytes - freed <= target:
                break
            victims.append(name)
            freed += size
        self._db.executemany("DELETE FROM chunks WHERE name = ?", [(n,) for n in victims])
        self.used_bytes -= freed
        for name in victims:
            self._verified.discard(name)
            self._path(name).unlink(missing_ok=True)
        if victims:
            log.debug("evicted %d chunks (%d bytes)", len(victims), freed)

    def flush(self) -> None:
        with self._lock:
            self._flush_touches_locked()

    def close(self) -> None:
        self.flush()
        self._db.close()
