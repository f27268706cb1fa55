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

A chunk changed on disk *after* this process verified it (a stray writer, a restored backup)
is caught by its inode's signature: every read already opens the chunk, and one ``fstat`` of
that descriptor is compared with the (inode, size, mtime, ctime) seen when the CRC was last
checked; any difference means the CRC is checked again before a byte is served. ``ctime``
cannot be set from userspace, so every write, truncate, rename over or ``utime`` through the
filesystem changes the signature (on kernels since 6.13 with a fine-grained ctime once the old
one was seen; on older kernels a change within the same clock tick, a few ms, as the check can
go unseen). Not caught: bits that rot below the filesystem (media, or raw writes to the block
device), which leave the inode alone; those are caught by the next process. Cost, measured on
the 2-core test machine at a load average of 13: the ``fstat`` takes 4-6 us of the 50-75 us a
4 KiB hit spends in ``read`` (under 10%, and far less of a read through FUSE), where checking
an 8 MiB chunk's CRC takes 10-18 ms: re-checking on every open would cost that much per open
of a large file for a random 4 KiB read, and sampling would promise nothing.

The disk may fill or fail under a running worker (another writer on a shared volume): then
``put`` raises :class:`CacheFull` and the caller reads through, recency updates stay in memory,
reads of chunks already here go on, and :attr:`ChunkStore.problem` says why until the disk has
room again (a fill succeeds and the filesystem has :data:`_ROOM_FRACTION` free). A damaged or
unopenable ``chunks.db`` is handled at start (``chunk_db``).

With ``private`` (a view without ``allow_other``) directories are 0700 and files 0600: the cache
holds the same bytes as the view and must not be readable by users the view refuses.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from pathlib import Path

from .chunk_db import is_damage, is_disk_full, open_record

log = logging.getLogger(__name__)

#: Recency updates are batched: a read must not cost a database write.
_TOUCH_FLUSH_SECONDS = 5.0
#: Recency updates kept while the disk refuses them; beyond this they are dropped (a hint only).
_TOUCH_MAX = 100_000
#: After a fill failed for want of space, fills read through for this long before trying again.
_FULL_RETRY_SECONDS = 1.0
#: The disk counts as having room again when this fraction of it is free (at most 64 MiB).
_ROOM_FRACTION = 0.05
_ROOM_MAX = 64 << 20
_READ_STEP = 1 << 20

#: What identifies the contents of a chunk file as verified: any write through the filesystem
#: changes one of these (see the module docstring).
Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
    def __init__(self, root: Path, capacity: int, private: bool = False) -> None:
        self.root = root
        self.capacity = capacity
        self.private = private
        #: Modes of what the store creates, for the view's privacy (module docstring).
        self.dir_mode = 0o700 if private else 0o755
        self.file_mode = 0o600 if private else 0o644
        self._data = root / "data"
        self._tmp = root / "tmp"
        for path in (root, self._data, self._tmp):
            path.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            if private and os.stat(path).st_mode & 0o077:  # made by a mount that allowed others
                os.chmod(path, self.dir_mode)
        self._lock = threading.Lock()
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
        #: Bytes held outside chunk files but inside the capacity: large files a direct tree
        #: assembled from their chunks.
        self.external_bytes = 0
        #: Called with a chunk's name when it was found corrupt and dropped (the tree unlinks
        #: its entry and relinks a refetched copy).
        self.on_discard: Callable[[str], None] | None = None
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        #: Chunks checked against their CRC by this process, with the signature of the file
        #: they were checked in; others (or a changed file) are checked on use.
        self._verified: dict[str, Signature] = {}
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

    # -- paths -----------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self._data / name[:2] / name

    def path(self, name: str) -> Path:
        """Where chunk ``name`` lives (it may not exist)."""
        return self._path(name)

    def _drop_all_files(self) -> None:
        """The record was lost: no chunk file can be checked any more (see chunk_db)."""
        dropped = 0
        for sub in self._data.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                dropped += sum(1 for _ in os.scandir(sub))
                shutil.rmtree(sub, ignore_errors=True)
            else:
                sub.unlink(missing_ok=True)
        log.warning("dropped %d chunk files that nothing can check any more", dropped)

    def _recover(self) -> None:
        """Drop leftovers of a crash: temp files, records without files, files without records."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        known = {name for (name,) in self._db.execute("SELECT name FROM chunks")}
        on_disk: set[str] = set()
        for sub in self._data.iterdir():
            if self.private and sub.stat().st_mode & 0o077:  # made by a mount that allowed others
                os.chmod(sub, self.dir_mode)
            for entry in os.scandir(sub):
                if entry.name in known:
                    on_disk.add(entry.name)
                else:
                    os.unlink(entry.path)
        missing = known - on_disk
        if missing:
            try:
                self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in missing])
            except sqlite3.Error as exc:
                self._write_failed("dropping the records of missing chunks", exc)
                self._gone |= missing
        if missing or len(known) != len(on_disk):
            log.info("cache recovery: %d chunks kept, %d records dropped", len(on_disk), len(missing))

    # -- the record ------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> tuple | None:
        """One row of a read of the record, or None (also when the record cannot be read:
        the chunk then counts as not cached and is read through)."""
        try:
            return self._db.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            self._record_failed(exc)
            return None

    def _write_many(self, sql: str, rows: list[tuple]) -> None:
        """All of ``rows`` or none (raises sqlite3.Error): a half-applied eviction would leave
        records of deleted files or the reverse."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _write_failed(self, what: str, exc: BaseException) -> None:
        """The disk refused a write: fills read through until it has room again."""
        if is_damage(exc):
            self._record_failed(exc)
            return
        reason = "full" if is_disk_full(exc) else "failing"
        message = f"cache disk is {reason} at {self.root} ({what}: {exc})"
        if self._full is None:
            log.error(message)
        self._full = message
        self._full_retry_at = time.monotonic() + _FULL_RETRY_SECONDS

    def _record_failed(self, exc: BaseException) -> None:
        """The record went bad under us: stop caching; the next start replaces it (chunk_db)."""
        if self._record_problem is None:
            self._record_problem = (f"the cache record {self.root / 'chunks.db'} failed ({exc}): reading "
                                    "through to the source without caching; restart the worker to rebuild it")
            log.error(self._record_problem)
        self._read_through = True

    def _room_again(self) -> bool:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= min(_ROOM_MAX, st.f_blocks * st.f_frsize * _ROOM_FRACTION)

    # -- lookups ---------------------------------------------------------------------------
    def contains(self, chunk: ChunkId) -> bool:
        name = chunk.name
        with self._lock:
            if name in self._gone:
                return False
            row = self._query("SELECT 1 FROM chunks WHERE name = ?", (name,))
        return row is not None

    def read(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes of a cached chunk, or None if it is not cached (or was found corrupt).

        The chunk's CRC is checked on its first read in this process and again whenever its
        file's signature changed since (module docstring).
        """
        name = chunk.name
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:  # not cached, or evicted between a check and this open
            self._verified.pop(name, None)
            self._forget_missing(name)
            return None
        try:
            signature = _signature(os.fstat(fd))
            if self._verified.get(name) != signature and not self._check(name, fd, signature):
                return None
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._touch(name)
        return data

    def verify(self, name: str) -> bool:
        """True if chunk ``name`` is cached and matches its CRC (checked once per process, and
        again if its file changed); a chunk that fails is dropped (and reported through
        ``on_discard``)."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            self._verified.pop(name, None)
            self._forget_missing(name)
            return False
        try:
            signature = _signature(os.fstat(fd))
            return self._verified.get(name) == signature or self._check(name, fd, signature)
        finally:
            os.close(fd)

    def record(self, name: str) -> tuple[int, int] | None:
        """(size, CRC32) of a cached chunk, or None."""
        with self._lock:
            if name in self._gone:
                return None
            return self._query("SELECT size, crc FROM chunks WHERE name = ?", (name,))

    def _check(self, name: str, fd: int, signature: Signature) -> bool:
        """Check the open chunk file against its record; drop it if it does not match."""
        row = self.record(name)
        if row is None:
            return False
        size, crc = row
        changed = name in self._verified
        actual = offset = 0
        while True:  # in steps: an 8 MiB chunk need not be in memory twice
            piece = os.pread(fd, _READ_STEP, offset)
            if not piece:
                break
            actual = zlib.crc32(piece, actual)
            offset += len(piece)
        if offset != size or actual != crc:
            try:
                current = os.stat(self._path(name)).st_ino == signature[0]
            except FileNotFoundError:
                current = False
            if current:  # not a file another reader already dropped (and a fill replaced)
                log.error("cached chunk %s %s does not match its CRC; dropping it and refetching", name,
                          "changed on disk since it was verified and" if changed else "failed verification:")
                self.discard(name)
            return False
        self._verified[name] = signature
        return True

    def _forget_missing(self, name: str) -> None:
        """A chunk file is gone (not cached, evicted, or deleted behind our back): make sure its
        record is gone too, or readers would be told it is cached."""
        with self._lock:
            if name in self._gone or self._path(name).exists():
                return
            row = self._query("SELECT size FROM chunks WHERE name = ?", (name,))
            if row is None:
                return
            log.warning("cached chunk %s disappeared from disk; it will be refetched", name)
            self._delete_record_locked(name, row[0])

    def _delete_record_locked(self, name: str, size: int) -> None:
        if self._read_through:
            self._gone.add(name)
        else:
            try:
                self._write_many("DELETE FROM chunks WHERE name = ?", [(name,)])
            except sqlite3.Error as exc:
                self._write_failed("dropping a record", exc)
                self._gone.add(name)
        self.used_bytes -= size
        self._touched.pop(name, None)

    # -- writes ----------------------------------------------------------------------------
    def put(self, chunk: ChunkId, data: bytes) -> None:
        """Store a verified chunk atomically, evicting least-recently-used chunks for room.

        Raises CacheFull if it cannot be stored; the caller then serves ``data`` uncached.
        """
        size = len(data)
        if self._read_through:
            raise CacheFull(self._record_problem or "the cache record cannot be used")
        if size > self.capacity:
            raise CacheFull(f"chunk of {size} bytes exceeds the cache capacity of {self.capacity}")
        if self._full is not None and time.monotonic() < self._full_retry_at:
            raise CacheFull(self._full)
        name = chunk.name
        self._reserve(size)
        tmp = self._tmp / f"{name}.{threading.get_ident()}"
        final = self._path(name)
        try:
            final.parent.mkdir(mode=self.dir_mode, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.file_mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, final)
            signature = _signature(os.stat(final))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._unreserve(size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._write_failed("writing a chunk", exc)
                self._make_room(size * 4, force=True)
                raise CacheFull(self._full or f"cache disk is full at {self.root}") from exc
            raise
        now = time.time()
        with self._lock:
            gone = name in self._gone
            previous = None if gone else self._query("SELECT size FROM chunks WHERE name = ?", (name,))
            try:
                self._write_many("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?)",
                                 [(name, size, zlib.crc32(data), now)])
            except sqlite3.Error as exc:
                # Without its record the file could never be checked: it must not stay.
                final.unlink(missing_ok=True)
                self._reserved -= size
                self._space_freed.notify_all()
                self._write_failed("recording a chunk", exc)
                raise CacheFull(self._full or self._record_problem or str(exc)) from exc
            self._gone.discard(name)
            self.used_bytes += size - (previous[0] if previous else 0)
            self._reserved -= size
            self._space_freed.notify_all()
            if self._full is not None and self._room_again():
                log.info("cache disk at %s has room again; caching resumes", self.root)
                self._full = None
            if self._gone and self._full is None:
                self._retry_gone_locked()
        self._verified[name] = signature

    def _retry_gone_locked(self) -> None:
        try:
            self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in self._gone])
        except sqlite3.Error:
            return
        self._gone.clear()

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
            row = None if name in self._gone else self._query("SELECT size FROM chunks WHERE name = ?", (name,))
            if row:
                self._delete_record_locked(name, row[0])
            self._touched.pop(name, None)
        self._verified.pop(name, None)
        self._path(name).unlink(missing_ok=True)
        if self.on_discard is not None:
            self.on_discard(name)

    # -- pins (direct trees) ---------------------------------------------------------------
    def pin(self, tree: str, rows: Iterable[tuple[str, str]]) -> None:
        """Exempt chunks from eviction for ``tree``: rows of (chunk name, path in the tree).

        Raises OSError if the record refuses the write (the tree is then not built)."""
        rows = [(n, tree, p) for n, p in rows]
        if rows and self._read_through:
            raise OSError(errno.EROFS, f"the cache record cannot be written: {self._record_problem}")
        if rows:
            with self._lock:
                try:
                    self._write_many("INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", rows)
                except sqlite3.Error as exc:
                    self._write_failed("pinning a direct tree's chunks", exc)
                    raise OSError(errno.ENOSPC if is_disk_full(exc) else errno.EIO,
                                  f"cannot record the direct tree's chunks in {self.root / 'chunks.db'}: {exc}") from exc

    def unpin(self, tree: str) -> None:
        if self._read_through:
            return
        with self._lock:
            try:
                self._write_many("DELETE FROM pins WHERE tree = ?", [(tree,)])
            except sqlite3.Error as exc:  # its chunks stay unevictable until the next start
                self._write_failed("unpinning a direct tree's chunks", exc)

    def pinned_trees(self) -> set[str]:
        with self._lock:
            try:
                return {t for (t,) in self._db.execute("SELECT DISTINCT tree FROM pins")}
            except sqlite3.Error as exc:
                self._record_failed(exc)
                return set()

    def pinned_paths(self, name: str) -> list[tuple[str, str]]:
        """(tree, path) of every tree entry linked to chunk ``name``."""
        with self._lock:
            try:
                return self._db.execute("SELECT tree, path FROM pins WHERE name = ?", (name,)).fetchall()
            except sqlite3.Error as exc:
                self._record_failed(exc)
                return []

    def reserve_external(self, size: int) -> bool:
        """Count ``size`` more bytes held outside chunk files against the capacity, evicting
        unpinned chunks for room; False (nothing reserved) if they do not fit."""
        with self._lock:
            row = self._query(
                "SELECT COALESCE(SUM(size), 0) FROM chunks WHERE name NOT IN (SELECT name FROM pins)"
            )
            if row is None:
                return False
            evictable = row[0]
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
        self._last_flush = time.monotonic()
        if not self._touched or self._read_through:
            return
        try:
            self._write_many("UPDATE chunks SET used = ? WHERE name = ?", [(t, n) for n, t in self._touched.items()])
        except sqlite3.Error as exc:  # recency is a hint: keep it for later, within bounds
            self._write_failed("recording recency", exc)
            if len(self._touched) > _TOUCH_MAX:
                self._touched.clear()
            return
        self._touched.clear()
        if self._full is not None and time.monotonic() >= self._full_retry_at and self._room_again():
            log.info("cache disk at %s has room again; caching resumes", self.root)
            self._full = None

    def _make_room(self, incoming: int, force: bool = False) -> None:
        """Evict least-recently-used chunks until ``incoming`` more bytes fit (or, with
        ``force``, until ``incoming`` bytes were freed: the disk filled before the capacity)."""
        with self._lock:
            self._evict_locked(incoming, force)

    def _evict_locked(self, incoming: int, force: bool = False) -> None:
        if self._read_through:  # nothing is stored, and the record cannot say what was evicted
            return
        if not force and self.used_bytes + self.external_bytes + self._reserved + incoming <= self.capacity:
            return
        self._flush_touches_locked()
        target = (max(0, self.used_bytes - incoming) if force
                  else self.capacity - self.external_bytes - self._reserved - incoming)
        victims = []
        freed = 0
        try:
            for name, size in self._db.execute(
                "SELECT name, size FROM chunks WHERE name NOT IN (SELECT name FROM pins) ORDER BY used"
            ):
                if self.used_bytes - freed <= target:
                    break
                if name in self._gone:  # its file and its bytes are gone already
                    continue
                victims.append(name)
                freed += size
            # Records first, all or none: a file is deleted only once nothing says it is cached.
            self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in victims])
        except sqlite3.Error as exc:
            self._write_failed("evicting", exc)
            return
        self.used_bytes -= freed
        for name in victims:
            self._verified.pop(name, None)
            self._touched.pop(name, None)
            self._path(name).unlink(missing_ok=True)
        if victims:
            log.debug("evicted %d chunks (%d bytes)", len(victims), freed)

    def flush(self) -> None:
        with self._lock:
            self._flush_touches_locked()

    def close(self) -> None:
        self.flush()
        self._db.close()
