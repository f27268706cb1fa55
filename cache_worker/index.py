"""The index: every file of the view with its size, ETag, version and mtime, built from a
listing snapshot (snapshot.py).

Stored as SQLite in the cache directory so that a restart mounts at once, without listing the
source again (``--refresh`` forces a new listing), and so that memory does not grow with the
number of objects: only directories are held in memory (a dataset has far fewer directories
than files); files are looked up on demand, which with the FUSE view's long entry/attr timeouts
happens about once per file per mount. ``getattr`` and ``readdir`` never touch the network.

The snapshot is built into a temporary file and renamed into place, so a crash while listing
leaves the previous snapshot (or none), never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .keys import KeyFilter, key_to_path, shown
from .source import RemoteObject, Source

log = logging.getLogger(__name__)

#: 2: files have a rowid, the stable node id the FUSE view gives the kernel (``fs.py``).
#: 3: files have the listed version (an S3 versionId), and the index names its snapshot.
FORMAT_VERSION = 3
_BATCH = 5000
_INSERT_FILE = "INSERT INTO files (parent, name, size, mtime, etag, version) VALUES (?,?,?,?,?,?)"
#: Warn about this many bad keys one by one, then only count them.
_WARN_LIMIT = 20

_SCHEMA = """
CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE dirs (id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name TEXT NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, mtime REAL NOT NULL, etag TEXT NOT NULL, version TEXT NOT NULL
);
CREATE UNIQUE INDEX files_by_name ON files (parent, name);
"""


@dataclass(frozen=True, slots=True)
class IndexSummary:
    source: str
    filter: dict
    files: int
    total_bytes: int
    skipped_keys: int
    shadowed_files: int
    built_at: float
    #: The id of the snapshot (snapshot.py) the index was built from; None: an index of an
    #: older worker, listed directly (it is listed again, into a snapshot).
    snapshot: str | None = None
    #: The identity of the first index of a line of refreshes (index_refresh.py): node ids
    #: mean the same files across the line. None: this index starts its own line.
    lineage: str | None = None

    def identity(self) -> str:
        """What must be equal for node ids to mean the same files (``attach.py`` resumes on it)."""
        return self.lineage or f"{self.source}|{self.built_at!r}|{self.files}|{self.total_bytes}"


@dataclass(frozen=True, slots=True)
class DirEntry:
    path: str


def build_index(
    source: Source,
    dest: Path,
    key_filter: KeyFilter = KeyFilter(),
    progress: Callable[[int], None] | None = None,
) -> IndexSummary:
    """List ``source`` into a fresh snapshot at ``dest``; returns what it holds."""
    return build_index_from(source.list(), source.uri, dest, key_filter, progress)


def build_index_from(
    objects: Iterable[RemoteObject],
    source_uri: str,
    dest: Path,
    key_filter: KeyFilter = KeyFilter(),
    progress: Callable[[int], None] | None = None,
    snapshot: str | None = None,
) -> IndexSummary:
    """Index ``objects`` (a listing of ``source_uri``) at ``dest``; returns what it holds.

    Nothing is kept unless ``objects`` is consumed to its end without an exception (a snapshot
    checks its hash on its last step): the scratch file is removed."""
    tmp = dest.with_name(dest.name + ".building")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)
        dirs: dict[tuple[str, ...], int] = {(): 1}
        conn.execute("INSERT INTO dirs VALUES (1, 0, '')")
        batch: list[tuple] = []
        listed = skipped = 0
        for obj in objects:
            listed += 1
            path = key_to_path(obj.key)
            if path is None:
                skipped += 1
                if skipped <= _WARN_LIMIT:
                    log.warning("skipping object key that cannot be a path: %s", shown(obj.key))
                continue
            if path.leaf is None:
                if not key_filter.include:  # a marker makes an empty directory visible
                    _ensure_dir(conn, dirs, path.parents)
                continue
            if not key_filter(obj.key):
                continue
            parent = _ensure_dir(conn, dirs, path.parents)
            batch.append((parent, path.leaf, obj.size, obj.mtime, obj.etag, obj.version))
            if len(batch) >= _BATCH:
                conn.executemany(_INSERT_FILE, batch)
                batch.clear()
                if progress:
                    progress(listed)
        conn.executemany(_INSERT_FILE, batch)
        if progress:
            progress(listed)
        shadowed = _drop_shadowed_files(conn)
        if skipped > _WARN_LIMIT:
            log.warning("skipped %d object keys that cannot be paths in all", skipped)
        files, total = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files").fetchone()
        summary = IndexSummary(
            source=source_uri,
            filter={"include": list(key_filter.include), "exclude": list(key_filter.exclude)},
            files=files,
            total_bytes=total,
            skipped_keys=skipped,
            shadowed_files=shadowed,
            built_at=time.time(),
            snapshot=snapshot,
        )
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("version", str(FORMAT_VERSION)), ("summary", json.dumps(_asdict(summary)))],
        )
        conn.commit()
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    conn.close()
    os.replace(tmp, dest)
    return summary


def _asdict(summary: IndexSummary) -> dict:
    return {f: getattr(summary, f) for f in summary.__slots__}


def _ensure_dir(conn: sqlite3.Connection, dirs: dict[tuple[str, ...], int], parts: tuple[str, ...]) -> int:
    found = dirs.get(parts)
    if found is not None:
        return found
    parent = _ensure_dir(conn, dirs, parts[:-1])
    cursor = conn.execute("INSERT INTO dirs (parent, name) VALUES (?, ?)", (parent, parts[-1]))
    dirs[parts] = cursor.lastrowid
    return cursor.lastrowid


def _drop_shadowed_files(conn: sqlite3.Connection) -> int:
    """When both ``a`` and ``a/b`` exist, the directory wins and the file ``a`` is hidden.

    A path cannot be both, and hiding the directory would hide everything under it; this is
    also what s3fs and Mountpoint for S3 do. Hidden files are logged and counted.
    """
    rows = conn.execute(
        "SELECT f.parent, f.name FROM files f JOIN dirs d ON d.parent = f.parent AND d.name = f.name"
    ).fetchall()
    for parent, name in rows[:_WARN_LIMIT]:
        log.warning("object %r is hidden by a directory of the same name", name)
    conn.executemany("DELETE FROM files WHERE parent = ? AND name = ?", rows)
    return len(rows)


def read_summary(path: Path) -> IndexSummary | None:
    """The summary of the snapshot at ``path``, or None if there is no usable one."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
        finally:
            conn.close()
        if meta.get("version") != str(FORMAT_VERSION):
            return None
        return IndexSummary(**json.loads(meta["summary"]))
    except (sqlite3.Error, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring unreadable index %s: %s", path, exc)
        return None


#: SQLite page cache per connection, KiB. Every FUSE session thread (80 by default) gets its
#: own connection, and SQLite's default cache is 2 MiB each, up to 160 MiB in all (probe:
#: entries() of 1,001 directories of 1,000 files from 80 threads +165 MB, from 1 thread +3 MB;
#: at 256 KiB +44 MB). In the real worker a walk of a 1M-object view grew it by 215 MB before
#: and 190 MB after this (bench/ANALYSIS.md, 2026-12-06): the rest has another cause. The index
#: is immutable and its pages stay in the kernel's page cache, so a miss here is a pread.
PAGE_CACHE_KIB = 256


class Index:
    """Read-only lookups over a built snapshot; safe to use from many threads."""

    def __init__(self, path: Path) -> None:
        summary = read_summary(path)
        if summary is None:
            raise ValueError(f"no usable index at {path}")
        self.summary = summary
        self._uri = f"file:{path}?mode=ro&immutable=1"
        self._local = threading.local()
        conn = self._conn()
        rows = conn.execute("SELECT id, parent, name FROM dirs ORDER BY id").fetchall()
        self._dir_ids: dict[str, int] = {}
        names: dict[int, str] = {}
        for dir_id, parent, name in rows:  # parents always have smaller ids
            path_ = name if parent <= 1 else f"{names[parent]}/{name}"
            names[dir_id] = "" if dir_id == 1 else path_
            self._dir_ids[names[dir_id]] = dir_id
        self._dir_paths = names

    def retire(self, path: Path) -> None:
        """Open further connections at ``path``, a hard link to this index's file, because a
        refresh is about to rename a new index over the old name (index_refresh.py). SQLite
        cannot open ``/proc/self/fd/N`` (it resolves the link and fails), so a second name it is;
        connections already open keep their descriptor either way."""
        self._uri = f"file:{path}?mode=ro&immutable=1"

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, with a small page cache (:data:`PAGE_CACHE_KIB`)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
            self._local.conn = conn
        return conn

    @property
    def files(self) -> int:
        return self.summary.files

    @property
    def total_bytes(self) -> int:
        return self.summary.total_bytes

    def max_file_size(self) -> int:
        """The largest file's size (0 for an empty snapshot); one scan of the files table."""
        row = self._conn().execute("SELECT MAX(size) FROM files").fetchone()
        return row[0] or 0

    def lookup(self, path: str) -> RemoteObject | DirEntry | None:
        """``path`` is relative to the root, without a leading slash ("" is the root)."""
        if path in self._dir_ids:
            return DirEntry(path)
        parent, _, name = path.rpartition("/")
        parent_id = self._dir_ids.get(parent)
        if parent_id is None:
            return None
        row = self._conn().execute(
            "SELECT size, mtime, etag, version FROM files WHERE parent = ? AND name = ?", (parent_id, name)
        ).fetchone()
        if row is None:
            return None
        return RemoteObject(key=path, size=row[0], etag=row[2], mtime=row[1], version=row[3])

    def listdir(self, path: str) -> Iterator[tuple[str, bool]]:
        """(name, is_dir) for every entry of directory ``path``."""
        dir_id = self._dir_ids[path]
        conn = self._conn()
        for (name,) in conn.execute("SELECT name FROM dirs WHERE parent = ? AND id != 1", (dir_id,)):
            yield name, True
        for (name,) in conn.execute("SELECT name FROM files WHERE parent = ?", (dir_id,)):
            yield name, False

    # -- by id: what the FUSE view's node ids are made of (``fs.py``) ------------------------
    def dir_path(self, dir_id: int) -> str | None:
        """The path of directory ``dir_id`` ("" for the root, id 1), or None."""
        return self._dir_paths.get(dir_id)

    def dir_paths(self) -> list[str]:
        """Every directory's path ("" for the root), parents before children."""
        return list(self._dir_paths.values())

    def file_sizes(self, file_ids: Iterable[int]) -> dict[int, int]:
        """Size by file id, of those of ``file_ids`` this snapshot has (one query per 500)."""
        ids = list(file_ids)
        out: dict[int, int] = {}
        conn = self._conn()
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            out.update(conn.execute(f"SELECT id, size FROM files WHERE id IN ({marks})", part).fetchall())
        return out

    def child_dir(self, dir_id: int, name: str) -> int | None:
        parent = self._dir_paths.get(dir_id)
        if parent is None:
            return None
        return self._dir_ids.get(f"{parent}/{name}" if parent else name)

    def child_file(self, dir_id: int, name: str) -> tuple[int, RemoteObject] | None:
        """(file id, object) of file ``name`` in directory ``dir_id``."""
        parent = self._dir_paths.get(dir_id)
        if parent is None:
            return None
        row = self._conn().execute(
            "SELECT id, size, mtime, etag, version FROM files WHERE parent = ? AND name = ?", (dir_id, name)
        ).fetchone()
        if row is None:
            return None
        key = f"{parent}/{name}" if parent else name
        return row[0], RemoteObject(key=key, size=row[1], etag=row[3], mtime=row[2], version=row[4])

    def file(self, file_id: int) -> RemoteObject | None:
        row = self._conn().execute(
            "SELECT parent, name, size, mtime, etag, version FROM files WHERE id = ?", (file_id,)
        ).fetchone()
        if row is None:
            return None
        parent = self._dir_paths[row[0]]
        key = f"{parent}/{row[1]}" if parent else row[1]
        return RemoteObject(key=key, size=row[2], etag=row[4], mtime=row[3], version=row[5])

    def entries(self, dir_id: int) -> list[tuple[str, bool, int, RemoteObject | None]]:
        """(name, is_dir, id, object or None) of every entry of directory ``dir_id``, in an order
        that is the same in every process (directories by id, then files by id): a directory
        offset the kernel kept across a worker restart still means the same entry."""
        parent = self._dir_paths.get(dir_id)
        if parent is None:
            return []
        prefix = f"{parent}/" if parent else ""
        conn = self._conn()
        out: list[tuple[str, bool, int, RemoteObject | None]] = [
            (name, True, child, None)
            for child, name in conn.execute(
                "SELECT id, name FROM dirs WHERE parent = ? AND id != 1 ORDER BY id", (dir_id,))
        ]
        for file_id, name, size, mtime, etag, version in conn.execute(
            "SELECT id, name, size, mtime, etag, version FROM files WHERE parent = ? ORDER BY id", (dir_id,)
        ):
            out.append((name, False, file_id, RemoteObject(prefix + name, size, etag, mtime, version)))
        return out

    def walk_files(self) -> Iterator[RemoteObject]:
        """Every file, directory by directory (the order warming uses)."""
        conn = sqlite3.connect(self._uri, uri=True)
        try:
            for parent, name, size, mtime, etag, version in conn.execute(
                "SELECT parent, name, size, mtime, etag, version FROM files ORDER BY parent, name"
            ):
                dir_path = self._dir_paths[parent]
                key = f"{dir_path}/{name}" if dir_path else name
                yield RemoteObject(key, size, etag, mtime, version)
        finally:
            conn.close()
