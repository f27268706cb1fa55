"""The chunk store's record in ``chunks.db``: reading and writing its rows (one per chunk, one per
object, pins apart), and recency, batched so that a read costs no database write.

Every use of the one connection is under the store's lock (threads share it).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable

from .store_layout import name_range as _range

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split

#: Recency updates are batched: a read must not cost a database write.
_TOUCH_FLUSH_SECONDS = 5.0

#: Recency updates kept while the disk refuses them; beyond this they are dropped (a hint only).
_TOUCH_MAX = 100_000


class StoreRecord:
    """Rows of the record and recency.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

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

    def touch(self, names: Iterable[str]) -> None:
        """Mark chunks used now, for reads this process never sees (passthrough): without it a
        passed-through file kept its fill time and LRU was FIFO for every file the kernel read."""
        now = time.time()
        with self._lock:
            for name in names:
                self._touched[name] = now

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

    def flush(self) -> None:
        with self._lock:
            self._flush_touches_locked()
