"""A new snapshot's index that keeps the node ids of the one it replaces (issue 15, part 2).

The FUSE view's node ids are index ids (``fs.py``): a directory's id, or ``FILE_BASE`` plus a
file's rowid. A mounted view can take a new snapshot without a remount only if every id the
kernel still holds keeps meaning what it meant:

* a directory whose path is in both snapshots keeps its id;
* a file whose path, size, ETag, version and mtime are all unchanged keeps its id, so its open
  descriptors, its page cache and its passthrough backing file go on untouched;
* a file that is new, or whose object changed (same path, other ETag or version), gets an id
  never given out in this line of snapshots: above the **high-water mark** the index keeps in
  its ``meta`` table, carried from refresh to refresh. An id the kernel may still hold for a
  removed or replaced file (an open descriptor, a dentry not yet invalidated) can therefore
  never come to mean another file.

The index is built as usual (``index.build_index_from``, the same rules for keys, filters and
shadowed files), then renumbered into its final file by SQL over both databases: directories
(few) by path in Python, files by one ``INSERT ... SELECT`` joined on the old index's
``(parent, name)`` index. A sentinel row at the high-water mark makes SQLite number the new
rows above it (a rowid without AUTOINCREMENT is ``max(rowid) + 1``).

What changed is returned as an :class:`IndexDiff`: counts, and the ``(parent id, name)`` of
every entry whose name no longer leads where the kernel may think it does (removed or replaced
files, removed directories) so that the view can ask the kernel to drop those dentries. New
names need no notice: a failed lookup is not cached by the kernel (FUSE answers ENOENT with an
error, which leaves no positive dentry and a negative one that is revalidated).

The refreshed index carries the **lineage** of the first index of its line (``IndexSummary``):
``attach.index_identity`` uses it, so a worker that restarts after a refresh still resumes the
connection the kernel holds, because the ids still mean the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datahoard.stats import RefreshStats

from .index import _SCHEMA, FORMAT_VERSION, Index, IndexSummary, _asdict, build_index_from
from .keys import KeyFilter
from .source import RemoteObject

HIGH_WATER_KEY = "high_water"


@dataclass
class IndexDiff:
    """What a refresh changed, as the view must know it."""

    added_files: int = 0
    removed_files: int = 0
    changed_files: int = 0
    added_dirs: int = 0
    removed_dirs: int = 0
    added_bytes: int = 0
    #: (parent directory id, name) of names that lead elsewhere now: removed or replaced files,
    #: removed directories. Ids are the *old* index's, which the kernel holds.
    stale_names: list[tuple[int, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added_files or self.removed_files or self.changed_files
                    or self.added_dirs or self.removed_dirs)

    def done(self, snapshot_id: str, started_at: float | None, token: str | None = None) -> RefreshStats:
        """What ``/stats`` says of a finished refresh that made this diff."""
        return RefreshStats(state="done", token=token, snapshot=snapshot_id, started_at=started_at,
                            finished_at=time.time(), message=self.describe(), added_files=self.added_files,
                            changed_files=self.changed_files, removed_files=self.removed_files,
                            added_bytes=self.added_bytes)

    def describe(self) -> str:
        return (f"{self.added_files} files added ({self.added_bytes} bytes), {self.changed_files} changed, "
                f"{self.removed_files} removed; {self.added_dirs} directories added, {self.removed_dirs} removed")


def high_water(path: Path) -> int:
    """The largest id ever given out in the line of indexes ``path`` belongs to."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT v FROM meta WHERE k = ?", (HIGH_WATER_KEY,)).fetchone()
        ids = conn.execute("SELECT MAX(id) FROM (SELECT id FROM files UNION ALL SELECT id FROM dirs)").fetchone()
    finally:
        conn.close()
    return max(int(row[0]) if row else 0, ids[0] or 0)


def build_continuing(
    old: Index,
    old_path: Path,
    objects: Iterable[RemoteObject],
    source_uri: str,
    dest: Path,
    key_filter: KeyFilter = KeyFilter(),
    progress: Callable[[int], None] | None = None,
    snapshot: str | None = None,
) -> tuple[IndexSummary, IndexDiff]:
    """Index ``objects`` at ``dest`` keeping ``old``'s ids (module doc); nothing is kept on error.

    ``old_path`` is ``old``'s file; it is only read. ``dest`` may be ``old_path``: the new index
    is renamed over it at the end (``Index.retire`` keeps ``old`` readable meanwhile)."""
    listing = dest.with_name(dest.name + ".listing")
    tmp = dest.with_name(dest.name + ".renumbering")
    tmp.unlink(missing_ok=True)
    try:
        fresh = build_index_from(objects, source_uri, listing, key_filter, progress, snapshot=snapshot)
        summary, diff = _renumber(old, old_path, listing, tmp, fresh)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        listing.unlink(missing_ok=True)
    os.replace(tmp, dest)
    return summary, diff


def _dirs(conn: sqlite3.Connection, schema: str) -> dict[int, tuple[str, int, str]]:
    """(path, parent id, name) by directory id; parents have smaller ids than their children."""
    out: dict[int, tuple[str, int, str]] = {}
    for dir_id, parent, name in conn.execute(f"SELECT id, parent, name FROM {schema}.dirs ORDER BY id"):
        path = "" if dir_id == 1 else (name if parent <= 1 else f"{out[parent][0]}/{name}")
        out[dir_id] = (path, parent, name)
    return out


def _renumber(old: Index, old_path: Path, listing: Path, tmp: Path,
              fresh: IndexSummary) -> tuple[IndexSummary, IndexDiff]:
    mark = high_water(old_path)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)
        conn.execute("ATTACH DATABASE ? AS n", (f"file:{listing}?mode=ro",))
        conn.execute("ATTACH DATABASE ? AS o", (f"file:{old_path}?mode=ro",))
        diff = IndexDiff()
        # Directories: the same path keeps its id, a new one numbers above the mark.
        old_dirs = {path: i for i, (path, _, _) in _dirs(conn, "o").items()}
        new_dirs = _dirs(conn, "n")
        final: dict[int, int] = {}
        next_id = mark
        rows = []
        for new_id, (path, parent, name) in new_dirs.items():  # parents come first
            kept = old_dirs.get(path)
            if kept is None:
                next_id += 1
                kept = next_id
                diff.added_dirs += 1
            final[new_id] = kept
            rows.append((kept, final[parent] if new_id != 1 else 0, name))
        conn.executemany("INSERT INTO dirs VALUES (?, ?, ?)", rows)
        kept_dirs = {path for path, _, _ in new_dirs.values()}
        for path, dir_id in old_dirs.items():
            if path not in kept_dirs:
                diff.removed_dirs += 1
                parent_path, _, name = path.rpartition("/")
                parent = old_dirs.get(parent_path)
                if parent is not None and parent_path in kept_dirs:
                    diff.stale_names.append((parent, name))
        conn.execute("CREATE TEMP TABLE dmap (new INTEGER PRIMARY KEY, final INTEGER NOT NULL)")
        conn.executemany("INSERT INTO dmap VALUES (?, ?)", final.items())
        # Files: unchanged ones keep their id; the sentinel makes new rows number above the mark.
        sentinel = max(next_id, mark) + 1
        conn.execute("INSERT INTO files VALUES (?, 0, '', 0, 0, '', '')", (sentinel,))
        conn.execute(
            """INSERT INTO files (id, parent, name, size, mtime, etag, version)
               SELECT o.id, m.final, f.name, f.size, f.mtime, f.etag, f.version
               FROM n.files f JOIN dmap m ON m.new = f.parent
               LEFT JOIN o.files o ON o.parent = m.final AND o.name = f.name AND o.size = f.size
                    AND o.etag = f.etag AND o.version = f.version AND o.mtime = f.mtime
               ORDER BY f.id""")
        conn.execute("DELETE FROM files WHERE id = ?", (sentinel,))
        diff.added_files, diff.added_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE id > ?", (sentinel,)).fetchone()
        gone = conn.execute(
            """SELECT o.parent, o.name, EXISTS (SELECT 1 FROM files f WHERE f.parent = o.parent AND f.name = o.name)
               FROM o.files o WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.id = o.id)""").fetchall()
        for parent, name, replaced in gone:
            diff.stale_names.append((parent, name))
            if replaced:
                diff.changed_files += 1
            else:
                diff.removed_files += 1
        diff.added_files -= diff.changed_files  # a replaced file's new id is not a new file
        new_mark = max(mark, sentinel, conn.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0])
        summary = dataclasses.replace(fresh, lineage=old.summary.identity())
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("version", str(FORMAT_VERSION)), ("summary", json.dumps(_asdict(summary))),
            (HIGH_WATER_KEY, str(new_mark))])
        conn.commit()
        conn.execute("DETACH DATABASE n")
        conn.execute("DETACH DATABASE o")
    finally:
        conn.close()
    return summary, diff


__all__ = ["IndexDiff", "build_continuing", "high_water", "HIGH_WATER_KEY"]
