"""Direct trees in the chunk store: chunks a tree links to are pinned (never evicted), and large
files a tree assembled from its chunks count against the capacity as external bytes.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterable

from .chunk_db import is_disk_full


class StorePins:
    """Pins and external bytes.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

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
