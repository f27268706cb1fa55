"""Verified chunks of remote objects on local disk, one file per object, with a capacity and
LRU eviction.

**Layout.** Every cached object lives in one file ``data/<id[:2]>/<id>``; its chunk ``i`` is
the byte range ``[i * chunk_size, ...)`` of that file (a small object is one chunk, the whole
file). One file per object is what FUSE passthrough needs: the kernel is handed *one* backing
file per open file (:meth:`ChunkStore.backing_fd`), so a large object must be whole in one file.
A large object not yet whole is a sparse file. ``chunks.db`` keeps one record per chunk (where
it is, its size, CRC32, last use), so verification, LRU and capacity accounting stay per chunk,
and one row per object (its size, and the whole-object verification below).

**Crash rule.** A chunk counts only once its record is committed. A one-chunk object is written
under ``tmp/`` and renamed into place (a fresh inode each time). A chunk of a larger object is
written with ``pwrite`` into the object file, then recorded: a crash in between leaves a range
without a record, never served and written again by the next fill (its blocks stay allocated
until then or until the object file goes: at most the fills in flight at the crash). Files
without any record are deleted at start-up, records without a file dropped. Nothing is fsync'ed:
after a machine crash every chunk is checked against its CRC the first time a new process serves
it, so a torn or lost range is never served; it is dropped and refetched. Objects are named by a
hash of key, ETag and size, so a changed object never reuses old data.

**Eviction.** A chunk of an *incomplete* object is evicted by punching a hole in its range
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``), or by unlinking the file if it was the object's last
chunk here. A *complete* object is only ever evicted whole, by unlinking its file: never
punched, truncated or rewritten in place, because the kernel may hold it open as a passthrough
backing file (even across a worker restart: the FUSE connection outlives the worker), and an
unlinked inode keeps its bytes for whoever has it open. Its space comes back when the last such
reader closes it; the capacity accounting counts it freed at the unlink. A chunk found corrupt in
a complete object drops the whole object for the same reason (its refetch makes a new file):
the store never writes into a complete file, so one that changed after it was passed through
was changed by someone else, and a handle the kernel already holds keeps reading that inode,
as the stray writer left it, until it is closed; every new open gets the refetched file.
Readers of this process that raced a punch of the range they read see it (a per-object
counter, bumped before every punch or unlink) and read again, so punched zeros are never served.

**Verification.** A chunk changed on disk *after* this process verified it (a stray writer, a
restored backup) is caught by its file's signature: every read already opens the file, and one
``fstat`` of that descriptor is compared with the (inode, size, mtime, ctime) under which the
chunk's CRC was last checked; any difference means the CRC is checked again before a byte is
served. ``ctime`` cannot be set from userspace, so every write, truncate, punch, rename over or
``utime`` through the filesystem changes the signature (on kernels since 6.13 with a
fine-grained ctime once the old one was seen; on older kernels a change within the same clock
tick, a few ms, can go unseen). The store's own writes (a fill of another chunk of the object,
a punch) carry what was verified over to the new signature when the file was unchanged just
before them. Not caught: bits that rot below the filesystem (media, raw writes to the block
device), which leave the inode alone; those are caught by the next process. Cost, measured on
the 2-core test machine at a load average of 13: the ``fstat`` takes 4-6 us of the 50-75 us a
4 KiB hit spends in ``read``, where checking an 8 MiB chunk's CRC takes 10-18 ms.

**Backing files.** :meth:`ChunkStore.backing_fd` opens an object file for the kernel only when
every chunk of it is recorded and verified. Once all of them were verified, the file's
signature and the machine's boot id are recorded in ``chunks.db`` (``objects.verified``): a new
process trusts that while both match (any write changes the ctime; a reboot, after which the
page cache may have lost unsynced writes, re-verifies), instead of re-reading a 1 GiB shard to
CRC it on its first open. Measured with ``python -m bench.backing_fd`` on the 2-core test
machine at a load average of 9 (best of 30 rounds of 1,000 calls / median round): a repeated
``backing_fd`` of a small cached object costs 2.5-2.6 / 5.5-6 us where the bare ``open`` +
``fstat`` + ``close`` of the same file costs 2.1-2.3 / 3.2-3.3 us, so about 0.4 us over the
open itself (paths are built as strings: a ``pathlib.Path`` alone costs 7 us, more than the
open); through ``DatasetCache.backing_fd`` (object id hashed from key, ETag and size) 3.9-4.1 /
7-8 us. The first ``backing_fd`` of a 1 GiB object (128 chunks) in a new process takes
0.3-0.7 ms with the recorded verification and 0.9-2.5 s without it (page cache warm: the CRC of
every chunk; more from a cold disk).

The disk may fill or fail under a running worker (another writer on a shared volume): then
``put`` (the ``pwrite``, the ``write`` or the record) raises :class:`CacheFull` and the caller
reads through, recency updates stay in memory, reads of chunks already here go on, and
:attr:`ChunkStore.problem` says why until the disk has room again (a fill succeeds and the
filesystem has :data:`_ROOM_FRACTION` free). A damaged or unopenable ``chunks.db`` is handled at
start (``chunk_db``).

**Older caches** (``data/<id>.<index>`` chunk files) are migrated at start-up: a chunk ``0`` is
renamed to the object's file (it is at offset 0 there, whatever the object's size), other chunks
are dropped with a log line, because moving them means copying every byte of every large object
before the mount is served (hours for a multi-TB cache) where a rename costs nothing; they are
refetched on use.

With ``private`` (a view without ``allow_other``) directories are 0700 and files 0600: the cache
holds the same bytes as the view and must not be readable by users the view refuses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
#: Reads that raced an eviction of their range are retried this often before reading through.
_READ_TRIES = 3

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

#: What identifies the contents of a file as verified: its (inode, size, mtime, ctime), any of
#: which any write through the filesystem changes (see the module docstring), packed into one
#: int of 4 x 64 bits: kept per object read, a tuple of four ints takes about 3x the memory.
Signature = int
_U64 = (1 << 64) - 1


def _signature(st: os.stat_result) -> Signature:
    return ((st.st_ino & _U64) << 192 | (st.st_size & _U64) << 128
            | (st.st_mtime_ns & _U64) << 64 | (st.st_ctime_ns & _U64))


def _inode(signature: Signature) -> int:
    return signature >> 192


def boot_id() -> str:
    """This boot of the machine: page-cache contents that were never written back are lost
    across a reboot, so a verification recorded under another boot is not trusted."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset + length)``, keeping the file's size."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


class CacheFull(Exception):
    """The chunk cannot be stored: larger than the capacity, or the disk is full."""


class CorruptChunk(Exception):
    """A chunk file failed its check; it has been dropped and must be refetched."""


@dataclass(frozen=True, slots=True)
class ChunkId:
    object_id: str
    index: int
    #: Where the chunk starts in its object's file, the object's size (0: the object is this
    #: one chunk) and the chunk's own size (0: not said). Not part of the identity: the name
    #: fixes them for one chunk size, and a cached chunk whose record disagrees with a stated
    #: size was cut with another chunk size (see ``_read_chunk``).
    offset: int = field(default=0, compare=False)
    object_size: int = field(default=0, compare=False)
    size: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        return f"{self.object_id}.{self.index}"


def chunk_of(oid: str, object_size: int, index: int, chunk_size: int) -> ChunkId:
    """Chunk ``index`` of an object of ``object_size`` bytes cut in chunks of ``chunk_size``."""
    start = index * chunk_size
    return ChunkId(oid, index, start, object_size, max(0, min(chunk_size, object_size - start)))


def object_id(key: str, etag: str, size: int) -> str:
    """Stable name of one version of one object."""
    return hashlib.sha256(f"{key}\0{etag}\0{size}".encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _split(name: str) -> tuple[str, int]:
    oid, _, index = name.rpartition(".")
    return oid, int(index)


def _range(oid: str) -> tuple[str, str]:
    """Bounds of the chunk names of ``oid`` (``oid.<n>``; ``/`` sorts right after ``.``)."""
    return oid + ".", oid + "/"


@dataclass(slots=True)
class _Trust:
    """What this process verified in one object file, under which signature: (position, size)
    of each chunk that matched its CRC, chunk 0 apart so that a small object (most objects,
    one per file read) needs no dict. Measured with tracemalloc over 3,000 small objects read:
    415 B per object read in this process, 267 B once its recency update is flushed (the
    chunk-file layout took 320 B; a dict per object and a tuple signature 707 B)."""

    signature: Signature
    first: tuple[int, int] | None = None
    more: dict[int, tuple[int, int]] | None = None
    #: Every chunk was verified under ``signature`` (set by backing_fd).
    whole: bool = False

    def get(self, index: int) -> tuple[int, int] | None:
        if index == 0:
            return self.first
        return self.more.get(index) if self.more else None

    def has(self, index: int) -> bool:
        return self.get(index) is not None

    def add(self, index: int, where: tuple[int, int]) -> None:
        if index == 0:
            self.first = where
        elif self.more is None:
            self.more = {index: where}
        else:
            self.more[index] = where

    def drop(self, index: int) -> None:
        if index == 0:
            self.first = None
        elif self.more:
            self.more.pop(index, None)


#: Eviction counters, striped by object: bumped before a chunk's bytes are punched, so a read
#: that started before sees it and reads again (never punched zeros).
_STRIPES = 1024


class ChunkStore:
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

    # -- paths -----------------------------------------------------------------------------
    def _path(self, oid: str) -> Path:
        return self._data / oid[:2] / oid

    def _file(self, oid: str) -> str:
        """``_path`` as a string, for the hot paths: a ``Path`` costs 7 us to build and makes
        ``os.open`` 5x slower (measured on the test machine), more than the open itself."""
        return f"{self._data_s}/{oid[:2]}/{oid}"

    def path(self, object_id: str) -> Path:
        """Where object ``object_id``'s file lives (it may not exist)."""
        return self._path(object_id)

    def _drop_all_files(self) -> None:
        """The record was lost: no chunk file can be checked any more (see chunk_db)."""
        dropped = 0
        for sub in self._data.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                dropped += sum(1 for _ in os.scandir(sub))
                shutil.rmtree(sub, ignore_errors=True)
            else:
                sub.unlink(missing_ok=True)
        log.warning("dropped %d cache files that nothing can check any more", dropped)

    def _recover(self) -> None:
        """Drop leftovers of a crash: temp files, records without files, files without records;
        move files of the older one-file-per-chunk layout."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        try:
            self._migrate()
        except sqlite3.Error as exc:  # finished at the next start; nothing is served meanwhile
            self._write_failed("migrating the cache layout", exc)
        known = {_split(name)[0] for (name,) in self._db.execute("SELECT name FROM chunks")}
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
        try:
            if missing:
                names = [n for oid in missing for (n,) in self._db.execute(
                    "SELECT name FROM chunks WHERE name >= ? AND name < ?", _range(oid))]
                self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in names])
            self._db.execute("DELETE FROM objects WHERE NOT EXISTS (SELECT 1 FROM chunks WHERE "
                             "name >= objects.oid || '.' AND name < objects.oid || '/')")
        except sqlite3.Error as exc:
            self._write_failed("dropping the records of missing files", exc)
            self._gone |= {n for oid in missing for n in self._names_of(oid)}
        if missing:
            log.info("cache recovery: %d objects kept, %d without a file dropped", len(on_disk), len(missing))

    def _names_of(self, oid: str) -> list[str]:
        try:
            return [n for (n,) in self._db.execute("SELECT name FROM chunks WHERE name >= ? AND name < ?", _range(oid))]
        except sqlite3.Error:
            return []

    def _migrate(self) -> None:
        """Files of the older layout (``<id>.<index>``, one per chunk): see the module docstring."""
        moved = dropped = dropped_bytes = 0
        drop: list[str] = []
        for sub in self._data.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if "." not in entry.name:
                    continue
                oid, _, index = entry.name.rpartition(".")
                if index == "0" and not os.path.lexists(self._path(oid)):
                    os.rename(entry.path, self._path(oid))
                    moved += 1
                    continue
                row = self._db.execute("SELECT size FROM chunks WHERE name = ?", (entry.name,)).fetchone()
                os.unlink(entry.path)
                if row is not None:
                    drop.append(entry.name)
                    dropped += 1
                    dropped_bytes += row[0]
        if drop:
            self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in drop])
        if moved:
            self._db.execute("INSERT OR IGNORE INTO objects (oid, size) SELECT substr(name, 1, length(name) - 2), "
                             "size FROM chunks WHERE name LIKE '%.0'")
        if moved or dropped:
            log.warning("cache layout migrated to one file per object: %d objects moved; %d chunks (%d bytes) "
                        "of large objects dropped (moving them would copy every byte before serving; they are "
                        "refetched on use)", moved, dropped, dropped_bytes)

    # -- the record ------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> tuple | None:
        """One row of a read of the record, or None (also when the record cannot be read:
        the chunk then counts as not cached and is read through)."""
        try:
            return self._db.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            self._record_failed(exc)
            return None

    def _write_many(self, sql: str, rows: list[tuple], more: Iterable[tuple[str, list[tuple]]] = ()) -> None:
        """All of ``rows`` (and of each (sql, rows) in ``more``) or none (raises sqlite3.Error):
        a half-applied eviction would leave records of deleted files or the reverse."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(sql, rows)
            for other_sql, other_rows in more:
                self._db.executemany(other_sql, other_rows)
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

    def recheck_room(self) -> bool:
        """While fills read through for want of space: look for room now, without waiting for a
        fill; True if caching resumes with this call.

        Recovery used to be noticed only by a fill (or a recency flush) made after the retry
        interval. A reader makes none once the kernel answers its reads itself (page cache with
        ``keep_cache``, passthrough, kernel opens), or when its few fills fell inside that
        interval: ``degraded`` then stayed set for good and nothing retried (issue 17). So the
        worker calls this every second: statvfs first (free), then one small write, because a
        disk that fails writes (EIO) may still report free space."""
        if self._full is None or self._read_through or not self._room_again():
            return False
        probe = self._tmp / f"room.{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
            try:
                os.write(fd, bytes(4096))
            finally:
                os.close(fd)
        except OSError as exc:
            self._write_failed("checking for room", exc)
            return False
        finally:
            probe.unlink(missing_ok=True)
        with self._lock:
            if self._full is None:
                return False
            self._full_retry_at = 0.0
            self._flush_touches_locked()  # recency kept while full; clears _full if it is written
            if self._full_retry_at:  # the record refused it (_write_failed): still no room
                return False
            if self._full is not None:  # nothing to flush: the probe decides
                log.info("cache disk at %s has room again; caching resumes", self.root)
                self._full = None
            if self._gone:
                self._retry_gone_locked()
            return True

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

    # -- lookups ---------------------------------------------------------------------------
    def contains(self, chunk: ChunkId) -> bool:
        name = chunk.name
        with self._lock:
            if name in self._gone:
                return False
            row = self._query("SELECT 1 FROM chunks WHERE name = ?", (name,))
        return row is not None

    def _open(self, oid: str) -> int | None:
        try:
            return os.open(self._file(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # not cached, or evicted between a check and this open
            self._trust.pop(oid, None)
            self._forget_missing(oid)
            return None

    def read(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes of a cached chunk, or None if it is not cached (or was found corrupt).

        The chunk's CRC is checked on its first read in this process and again whenever its
        file's signature changed since (module docstring).

        A chunk of an object not known whole is read under the object's lock, which eviction
        takes to punch chunks out: a read racing a punch could otherwise get the punched zeros
        (the epoch check narrowed that window but a hammering test still found it). A whole
        object is never punched, only unlinked, which an open descriptor survives: its reads
        take no lock.
        """
        trust = self._trust.get(chunk.object_id)
        if trust is not None and trust.whole:
            return self._read_chunk(chunk, offset, length)
        with self._object_lock(chunk.object_id):
            return self._read_chunk(chunk, offset, length)

    def _read_chunk(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        oid, index = chunk.object_id, chunk.index
        stripe = hash(oid) % _STRIPES
        for _ in range(_READ_TRIES):
            epoch = self._epochs[stripe]
            if epoch & 1:  # chunks of this stripe are being dropped right now
                time.sleep(0)
                continue
            fd = self._open(oid)
            if fd is None:
                return None
            try:
                signature = _signature(os.fstat(fd))
                trust = self._trust.get(oid)
                where = trust.get(index) if trust is not None and trust.signature == signature else None
                if where is None:
                    where = self._check(chunk.name, fd, signature)
                    if where is None:
                        if self._epochs[stripe] != epoch:
                            continue  # raced an eviction of this object
                        return None
                if chunk.size and where != (chunk.offset, chunk.size):
                    # Cut with another chunk size (a cache from a release with other tuning):
                    # its record's range is not this chunk's, and serving it by name would
                    # give the bytes of that other range. Refetched under today's geometry.
                    log.warning("cached chunk %s covers [%d, %d), not [%d, %d) (cut with another chunk size); "
                                "dropping it and refetching", chunk.name, where[0], where[0] + where[1],
                                chunk.offset, chunk.offset + chunk.size)
                    self.discard(chunk.name)
                    return None
                data = os.pread(fd, min(length, max(0, where[1] - offset)), where[0] + offset)
            finally:
                os.close(fd)
            if self._epochs[stripe] == epoch:
                self._touch(chunk.name)
                return data
        return None  # kept losing a race with eviction: read through

    def verify(self, chunk: ChunkId) -> bool:
        """True if ``chunk`` is cached and matches its CRC (checked once per process, and again
        if its file changed); a chunk that fails is dropped (and reported through
        ``on_discard``)."""
        fd = self._open(chunk.object_id)
        if fd is None:
            return False
        try:
            signature = _signature(os.fstat(fd))
            trust = self._trust.get(chunk.object_id)
            if trust is not None and trust.signature == signature and trust.has(chunk.index):
                return True
            return self._check(chunk.name, fd, signature) is not None
        finally:
            os.close(fd)

    def record(self, name: str) -> tuple[int, int] | None:
        """(size, CRC32) of a cached chunk, or None."""
        with self._lock:
            if name in self._gone:
                return None
            return self._query("SELECT size, crc FROM chunks WHERE name = ?", (name,))

    def _check(self, name: str, fd: int, signature: Signature) -> tuple[int, int] | None:
        """Check one chunk in the open object file against its record; drop it if it does not
        match. Returns (position, size) of the chunk if it matched."""
        with self._lock:
            row = None if name in self._gone else self._query(
                "SELECT size, crc, pos FROM chunks WHERE name = ?", (name,))
        if row is None:
            return None
        size, crc, pos = row
        oid, index = _split(name)
        stripe = hash(oid) % _STRIPES
        epoch = self._epochs[stripe]
        before = self._trust.get(oid)
        actual = done = 0
        while done < size:  # in steps: an 8 MiB chunk need not be in memory twice
            piece = os.pread(fd, min(_READ_STEP, size - done), pos + done)
            if not piece:
                break
            actual = zlib.crc32(piece, actual)
            done += len(piece)
        if done != size or actual != crc:
            if self._epochs[stripe] != epoch or epoch & 1:
                return None  # evicted while we read it: not corrupt, just gone
            try:
                current = os.stat(self._path(oid)).st_ino == _inode(signature)
            except FileNotFoundError:
                current = False
            if current:  # not a file another reader already dropped (and a fill replaced)
                changed = before is not None and before.has(index)
                log.error("cached chunk %s %s does not match its CRC; dropping it and refetching", name,
                          "changed on disk since it was verified and" if changed else "failed verification:")
                self.discard(name)
            return None
        trust = self._trust.get(oid)
        if trust is None or trust.signature != signature:
            trust = self._trust[oid] = _Trust(signature)
        trust.add(index, (pos, size))
        return pos, size

    def _forget_missing(self, oid: str) -> None:
        """An object file is gone (not cached, evicted, or deleted behind our back): make sure
        its records are gone too, or readers would be told it is cached."""
        with self._lock:
            if self._path(oid).exists():
                return
            rows = self._rows_of_locked(oid)
            rows = [r for r in rows if r[0] not in self._gone]
            if not rows:
                return
            log.warning("cached object file %s disappeared from disk; it will be refetched", oid)
            for name, size, _ in rows:
                self._delete_record_locked(name, size)
            self._drop_object_row_locked(oid)

    def _rows_of_locked(self, oid: str) -> list[tuple[str, int, int]]:
        try:
            return self._db.execute("SELECT name, size, pos FROM chunks WHERE name >= ? AND name < ?",
                                    _range(oid)).fetchall()
        except sqlite3.Error as exc:
            self._record_failed(exc)
            return []

    def _drop_object_row_locked(self, oid: str) -> None:
        if self._read_through:
            return
        try:
            self._db.execute("DELETE FROM objects WHERE oid = ?", (oid,))
        except sqlite3.Error as exc:
            self._write_failed("dropping an object's record", exc)

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
        if self.on_change is not None:
            self.on_change((name,), False)

    def _complete_locked(self, oid: str, rows: list[tuple[str, int, int]]) -> bool:
        """Every byte of the object is recorded (its file may be a backing file)."""
        row = self._query("SELECT size FROM objects WHERE oid = ?", (oid,))
        return row is not None and bool(rows) and sum(size for _, size, _ in rows) >= row[0]

    # -- backing files ---------------------------------------------------------------------
    def backing_fd(self, object_id: str, chunks: list[ChunkId]) -> int | None:
        """An ``O_RDONLY | O_CLOEXEC`` descriptor of the object's file if every one of
        ``chunks`` (all of the object's) is here and verified, else None (the view then serves
        reads itself). The caller owns the descriptor. See the module docstring for what is
        trusted and what it costs."""
        fd, signature = self._open_backing(object_id)
        if fd is None or signature is None:
            return fd
        try:
            if self._backing_ok(object_id, chunks, fd, signature):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def trusted_backing_fd(self, object_id: str) -> int | None:
        """The hot path of :meth:`backing_fd`: a descriptor only if this process already
        vouched for the whole file as it is now (no record lookup, no list of chunks)."""
        fd, signature = self._open_backing(object_id)
        if fd is not None and signature is not None:
            os.close(fd)
            return None
        return fd

    def _open_backing(self, object_id: str) -> tuple[int | None, Signature | None]:
        """(fd, None) if the file is open and already vouched for; (fd, its signature) if it
        still has to be checked; (None, None) if it is not here."""
        try:
            fd = os.open(self._file(object_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            signature = _signature(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        trust = self._trust.get(object_id)
        if trust is not None and trust.whole and trust.signature == signature:
            return fd, None
        return fd, signature

    def _backing_ok(self, oid: str, chunks: list[ChunkId], fd: int, signature: Signature) -> bool:
        with self._lock:
            rows = {name: (pos, size) for name, size, pos in self._rows_of_locked(oid) if name not in self._gone}
            verified = self._query("SELECT verified FROM objects WHERE oid = ?", (oid,))
        if not chunks or any(c.name not in rows for c in chunks):
            return False
        mark = f"{signature:x}:{self._boot}"
        if verified is not None and verified[0] == mark and self._boot:
            trust = self._trust.get(oid)
            if trust is None or trust.signature != signature:
                trust = self._trust[oid] = _Trust(signature)
            for c in chunks:
                trust.add(c.index, rows[c.name])
            trust.whole = True
            return True
        for c in chunks:
            trust = self._trust.get(oid)
            if trust is not None and trust.signature == signature and trust.has(c.index):
                continue
            if self._check(c.name, fd, signature) is None:
                return False
        trust = self._trust.get(oid)
        if trust is None or trust.signature != signature or not all(trust.has(c.index) for c in chunks):
            return False  # changed while we checked it: the next open checks again
        trust.whole = True
        if not self._read_through:
            with self._lock:
                try:
                    self._db.execute("UPDATE objects SET verified = ? WHERE oid = ?", (mark, oid))
                except sqlite3.Error as exc:  # only a saving: the next process checks again
                    self._write_failed("recording an object's verification", exc)
        return True

    def source_checked(self, object_id: str) -> bool:
        """Whether the source's checksum vouched for the object whole (``mark_checked``)."""
        with self._lock:  # one connection shared by threads: every use under the lock
            row = self._query("SELECT checked FROM objects WHERE oid = ?", (object_id,))
        return bool(row and row[0])

    def mark_checked(self, object_id: str) -> None:
        if self._read_through:
            return
        with self._lock:
            try:
                self._db.execute("UPDATE objects SET checked = 1 WHERE oid = ?", (object_id,))
            except sqlite3.Error as exc:
                self._write_failed("recording an object's check", exc)

    def adopt(self, source: str, target: str) -> bool:
        """Give every chunk of object ``source`` the same chunk of ``target`` by renaming its
        file and its records (a checked twin becoming the real object, verify.py): only when
        nothing of ``target`` is here. False (nothing changed) otherwise or if the record
        refuses. A crash between the record and the rename leaves records without a file and a
        file without records: both dropped at the next start, refetched on use."""
        with self._object_lock(target), self._object_lock(source), self._lock:
            if self._read_through or self._rows_of_locked(target) or os.path.lexists(self._path(target)):
                return False
            rows = [r for r in self._rows_of_locked(source) if r[0] not in self._gone]
            if not rows or len(rows) != len(self._rows_of_locked(source)):
                return False
            low, high = _range(source)
            try:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO chunks SELECT ? || substr(name, ?), size, crc, used, pos FROM chunks "
                                 "WHERE name >= ? AND name < ?", (target, len(source) + 1, low, high))
                self._db.execute("DELETE FROM chunks WHERE name >= ? AND name < ?", (low, high))
                self._db.execute("INSERT OR REPLACE INTO objects (oid, size) SELECT ?, size FROM objects WHERE oid = ?",
                                 (target, source))
                self._db.execute("DELETE FROM objects WHERE oid = ?", (source,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                self._write_failed("renaming a checked object", exc)
                return False
            for name, _, _ in rows:
                if name in self._touched:
                    self._touched[target + name[len(source):]] = self._touched.pop(name)
            if self.on_change is not None:
                self.on_change([n for n, _, _ in rows], False)
                self.on_change([target + n[len(source):] for n, _, _ in rows], True)
            self._epochs[hash(source) % _STRIPES] += 2  # even: a change done (see _drop_files_locked)
            trust = self._trust.pop(source, None)
            self._path(target).parent.mkdir(mode=self.dir_mode, exist_ok=True)
            try:
                before = _signature(os.stat(self._path(source)))
                os.rename(self._path(source), self._path(target))
                after = _signature(os.stat(self._path(target)))
            except OSError as exc:  # its records now name a missing file: found and dropped on use
                log.warning("renaming the checked object %s failed: %s", target, exc)
                return True
            if trust is not None and trust.signature == before:  # a rename moves the ctime
                trust.signature, trust.whole = after, False
                self._trust[target] = trust
            return True

    # -- writes ----------------------------------------------------------------------------
    def put(self, chunk: ChunkId, data: bytes) -> None:
        """Store a verified chunk, evicting least-recently-used chunks for room.

        Raises CacheFull if it cannot be stored; the caller then serves ``data`` uncached.
        """
        size = len(data)
        if self._read_through:
            raise CacheFull(self._record_problem or "the cache record cannot be used")
        if size > self.capacity:
            raise CacheFull(f"chunk of {size} bytes exceeds the cache capacity of {self.capacity}")
        if self._full is not None and time.monotonic() < self._full_retry_at:
            raise CacheFull(self._full)
        oid, name = chunk.object_id, chunk.name
        total = chunk.object_size or size
        whole = chunk.offset == 0 and size == total
        with self._object_lock(oid):
            if self.contains(chunk) and self._path(oid).exists():
                return  # a chunk's name fixes its bytes: written already (by a parallel fill)
            self._reserve(size)
            final = self._path(oid)
            try:
                final.parent.mkdir(mode=self.dir_mode, exist_ok=True)
                if whole:
                    before = None
                    after = self._write_whole(name, final, data)
                else:
                    before, after = self._write_range(final, chunk.offset, data)
            except OSError as exc:
                self._unreserve(size)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._write_failed("writing a chunk", exc)
                    self._make_room(size * 4, force=True)
                    raise CacheFull(self._full or f"cache disk is full at {self.root}") from exc
                raise
            self._record(chunk, data, total, whole, final)
            trust = self._trust.get(oid)
            if whole or trust is None or before is None or trust.signature != before:
                trust = self._trust[oid] = _Trust(after)
            else:  # our own write: what was verified before still is
                trust.signature = after
                trust.whole = False
            trust.add(chunk.index, (chunk.offset, size))

    def _write_whole(self, name: str, final: Path, data: bytes) -> Signature:
        tmp = self._tmp / f"{name}.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return _signature(os.stat(final))

    def _write_range(self, final: Path, offset: int, data: bytes) -> tuple[Signature | None, Signature]:
        """``pwrite`` one chunk into the object file; (signature before, after)."""
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
        try:
            st = os.fstat(fd)
            before = _signature(st)
            view = memoryview(data)
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
            except OSError:
                try:  # give back what the torn range took (it has no record, so it is never served)
                    punch_hole(fd, offset, len(data))
                except OSError:
                    pass
                if st.st_size == 0:  # made by this fill: nothing else lives in it
                    final.unlink(missing_ok=True)
                raise
            return before, _signature(os.fstat(fd))
        finally:
            os.close(fd)

    def _record(self, chunk: ChunkId, data: bytes, total: int, whole: bool, final: Path) -> None:
        size, name, oid = len(data), chunk.name, chunk.object_id
        now = time.time()
        with self._lock:
            gone = name in self._gone
            previous = None if gone else self._query("SELECT size FROM chunks WHERE name = ?", (name,))
            try:
                self._write_many("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                                 [(name, size, zlib.crc32(data), now, chunk.offset)],
                                 [("INSERT INTO objects (oid, size) VALUES (?, ?) ON CONFLICT (oid) DO UPDATE "
                                   "SET size = excluded.size, verified = NULL", [(oid, total)])])
            except sqlite3.Error as exc:
                # Without its record the range could never be checked: it must not stay.
                if whole or not self._rows_of_locked(oid):
                    final.unlink(missing_ok=True)
                else:
                    try:
                        fd = os.open(final, os.O_WRONLY | os.O_CLOEXEC)
                        try:
                            punch_hole(fd, chunk.offset, size)
                        finally:
                            os.close(fd)
                    except OSError:
                        pass
                self._reserved -= size
                self._space_freed.notify_all()
                self._write_failed("recording a chunk", exc)
                raise CacheFull(self._full or self._record_problem or str(exc)) from exc
            self._gone.discard(name)
            self.used_bytes += size - (previous[0] if previous else 0)
            if self.on_change is not None:
                self.on_change((name,), True)
            self._reserved -= size
            self._space_freed.notify_all()
            if self._full is not None and self._room_again():
                log.info("cache disk at %s has room again; caching resumes", self.root)
                self._full = None
            if self._gone and self._full is None:
                self._retry_gone_locked()

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
        """Drop a chunk (it failed its check, or its object's check). A chunk of a complete
        object drops the whole object: its file may be a backing file and is never punched."""
        oid, _ = _split(name)
        with self._object_lock(oid):
            with self._lock:
                rows = [r for r in self._rows_of_locked(oid) if r[0] not in self._gone]
                mine = [r for r in rows if r[0] == name]
                if not mine:
                    return
                complete = self._complete_locked(oid, rows)
                victims = rows if complete or len(rows) == 1 else mine
                for vname, vsize, _ in victims:
                    self._delete_record_locked(vname, vsize)
                self._drop_files_locked(oid, victims, unlink=len(victims) == len(rows))
        if self.on_discard is not None:
            for vname, _, _ in victims:
                self.on_discard(vname)

    def _drop_files_locked(self, oid: str, victims: list[tuple[str, int, int]], unlink: bool) -> None:
        """Take chunks off disk once their records are gone; the caller holds the object's lock.

        The stripe's epoch is a sequence lock: odd while chunks are being dropped, bumped again
        once they are gone. A read that began in either state, or saw the epoch change, reads
        again: bumping only before the punch let a read that started just after the bump (and
        still found the chunk trusted) return the punched zeros (caught by the racing test)."""
        stripe = hash(oid) % _STRIPES
        self._epochs[stripe] += 1
        try:
            self._drop_files_inner_locked(oid, victims, unlink)
        finally:
            self._epochs[stripe] += 1

    def _drop_files_inner_locked(self, oid: str, victims: list[tuple[str, int, int]], unlink: bool) -> None:
        trust = self._trust.get(oid)
        if trust is not None:
            trust.whole = False
            for vname, _, _ in victims:
                trust.drop(_split(vname)[1])
        if unlink:
            self._trust.pop(oid, None)
            self._drop_object_row_locked(oid)
            self._path(oid).unlink(missing_ok=True)
            return
        try:
            fd = os.open(self._path(oid), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            before = _signature(os.fstat(fd))
            for _, size, pos in victims:
                punch_hole(fd, pos, size)
            after = _signature(os.fstat(fd))
        except OSError as exc:  # the range stays allocated, unrecorded (never served)
            if not self._punch_failed:
                log.warning("cannot punch holes in cache files at %s (%s): space of evicted chunks of "
                            "partly cached objects comes back when the object is dropped", self.root, exc)
                self._punch_failed = True
            return
        finally:
            os.close(fd)
        if trust is not None and trust.signature == before:
            trust.signature = after

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
        """LRU by chunk; a complete object goes whole (module docstring). Objects being written
        by another thread (their lock is busy) are skipped: they are in use anyway."""
        if self._read_through:  # nothing is stored, and the record cannot say what was evicted
            return
        if not force and self.used_bytes + self.external_bytes + self._reserved + incoming <= self.capacity:
            return
        self._flush_touches_locked()
        target = (max(0, self.used_bytes - incoming) if force
                  else self.capacity - self.external_bytes - self._reserved - incoming)
        # oid -> (the object's recorded rows, rows chosen, whole?)
        plans: dict[str, tuple[list[tuple[str, int, int]], list[tuple[str, int, int]], bool]] = {}
        skipped: set[str] = set()
        locks: list = []
        freed = 0
        try:
            try:
                order = self._db.execute(
                    "SELECT name, size, pos FROM chunks WHERE name NOT IN (SELECT name FROM pins) ORDER BY used"
                ).fetchall()
                for name, size, pos in order:
                    if self.used_bytes - freed <= target:
                        break
                    if name in self._gone:  # its file and its bytes are gone already
                        continue
                    oid = _split(name)[0]
                    if oid in skipped:
                        continue
                    plan = plans.get(oid)
                    if plan is None:
                        lock = self._object_lock(oid, blocking=False)
                        if not lock.__enter__():
                            lock.__exit__(None, None, None)
                            skipped.add(oid)
                            continue
                        locks.append(lock)
                        rows = [r for r in self._rows_of_locked(oid) if r[0] not in self._gone]
                        whole = self._complete_locked(oid, rows)
                        if whole and self._db.execute(
                            "SELECT 1 FROM pins WHERE name >= ? AND name < ? LIMIT 1", _range(oid)
                        ).fetchone():
                            skipped.add(oid)
                            continue
                        plan = plans[oid] = (rows, list(rows) if whole else [], whole)
                        if whole:
                            freed += sum(r[1] for r in rows)
                            continue
                    if plan[2]:
                        continue
                    plan[1].append((name, size, pos))
                    freed += size
                victims = [r[0] for _, chosen, _ in plans.values() for r in chosen]
                # Records first, all or none: a byte is dropped only once nothing says it is cached.
                gone_objects = [(oid,) for oid, (rows, chosen, _) in plans.items() if chosen and len(chosen) == len(rows)]
                self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in victims],
                                 [("DELETE FROM objects WHERE oid = ?", gone_objects)])
            except sqlite3.Error as exc:
                self._write_failed("evicting", exc)
                return
            self.used_bytes -= freed
            if self.on_change is not None and victims:
                self.on_change(victims, False)
            for oid, (rows, chosen, _) in plans.items():
                if not chosen:
                    continue
                for name, _, _ in chosen:
                    self._touched.pop(name, None)
                self._drop_files_locked(oid, chosen, unlink=len(chosen) == len(rows))
            if victims:
                log.debug("evicted %d chunks (%d bytes)", len(victims), freed)
        finally:
            for lock in locks:
                lock.__exit__(None, None, None)

    def flush(self) -> None:
        with self._lock:
            self._flush_touches_locked()

    def close(self) -> None:
        """Under the lock: a background check still reading (verify.py does not wait for it)
        then gets an error from the closed record, not a crash of the process in SQLite."""
        with self._lock:
            self._flush_touches_locked()
            self._db.close()
