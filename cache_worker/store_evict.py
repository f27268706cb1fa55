"""Eviction from the chunk store: LRU by chunk, punching chunks of incomplete objects, unlinking
complete ones, and dropping chunks found corrupt.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sqlite3

from .store_layout import name_range as _range
from .store_layout import split_name as _split
from .store_trust import signature as _signature

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset + length)``, keeping the file's size."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


#: Eviction counters, striped by object: bumped before a chunk's bytes are punched, so a read
#: that started before sees it and reads again (never punched zeros).
STRIPES = 1024


class StoreEviction:
    """Eviction and discarding.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

    def discard(self, name: str, inode: int | None = None) -> bool:
        """Drop a chunk (it failed its check, or its object's check). A chunk of a complete
        object drops the whole object: its file may be a backing file and is never punched.

        ``inode``: the object file the check found wrong. If another thread has dropped that
        file and a fill has replaced it since (a check that found the same corruption first),
        the file now there is not the one found wrong, and nothing is dropped: without this,
        a check that lost that race unlinked the good, just fetched file, and a direct tree
        entry linked to it was unlinked and fetched a third time. Checked under the object's
        lock, which a fill holds while it replaces the file. True if something was dropped."""
        oid, _ = _split(name)
        with self._object_lock(oid):
            if inode is not None:
                try:
                    if os.stat(self._path(oid)).st_ino != inode:
                        return False
                except FileNotFoundError:
                    return False
            with self._lock:
                rows = [r for r in self._rows_of_locked(oid) if r[0] not in self._gone]
                mine = [r for r in rows if r[0] == name]
                if not mine:
                    return False
                complete = self._complete_locked(oid, rows)
                victims = rows if complete or len(rows) == 1 else mine
                for vname, vsize, _ in victims:
                    self._delete_record_locked(vname, vsize)
                    self._discarded.add(vname)
                self._drop_files_locked(oid, victims, unlink=len(victims) == len(rows))
        if self.on_discard is not None:
            for vname, _, _ in victims:
                self.on_discard(vname)
        return True

    def was_discarded(self, name: str) -> bool:
        """A check dropped chunk ``name`` (``discard``) and it has not been stored since."""
        with self._lock:
            return name in self._discarded

    def _drop_files_locked(self, oid: str, victims: list[tuple[str, int, int]], unlink: bool) -> None:
        """Take chunks off disk once their records are gone; the caller holds the object's lock.

        The stripe's epoch is a sequence lock: odd while chunks are being dropped, bumped again
        once they are gone. A read that began in either state, or saw the epoch change, reads
        again: bumping only before the punch let a read that started just after the bump (and
        still found the chunk trusted) return the punched zeros (caught by the racing test)."""
        stripe = hash(oid) % STRIPES
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
            if self.on_object_gone is not None:
                self.on_object_gone(oid)
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
