"""Writes to the chunk store: fills (``put``), the room they reserve, and renaming a checked twin
into place (``adopt``).

**Crash rule.** A chunk counts only once its record is committed. A one-chunk object is written
under ``tmp/`` and renamed into place (a fresh inode each time). A chunk of a larger object is
written with ``pwrite`` into the object file, then recorded: a crash in between leaves a range
without a record, never served and written again by the next fill (its blocks stay allocated
until then or until the object file goes: at most the fills in flight at the crash). Files
without any record are deleted at start-up, records without a file dropped. Nothing is fsync'ed:
after a machine crash every chunk is checked against its CRC the first time a new process serves
it, so a torn or lost range is never served; it is dropped and refetched. Objects are named by a
hash of key, ETag and size, so a changed object never reuses old data.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path

from .store_errors import CacheFull
from .store_evict import STRIPES as _STRIPES
from .store_evict import punch_hole
from .store_layout import ChunkId
from .store_layout import name_range as _range
from .store_trust import Signature, Trust as _Trust
from .store_trust import signature as _signature

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split


class StoreWrites:
    """Fills and renames.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

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
            self._discarded.discard(name)
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
                self._discarded.discard(target + name[len(source):])
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
