"""The chunk store at start-up: leftovers of a crash (the crash rule is in :mod:`.store_write`), a
record that was lost, and caches of the older layout.

**Older caches** (``data/<id>.<index>`` chunk files) are migrated at start-up: a chunk ``0`` is
renamed to the object's file (it is at offset 0 there, whatever the object's size), other chunks
are dropped with a log line, because moving them means copying every byte of every large object
before the mount is served (hours for a multi-TB cache) where a rename costs nothing; they are
refetched on use.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3

from .store_layout import name_range as _range
from .store_layout import split_name as _split

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split


class StoreStartup:
    """Recovery and migration at start-up.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

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
