"""Opening ``chunks.db``, the chunk store's record of what it holds, whatever the disk did to it.

A worker whose record cannot be opened must still serve reads, or a pod crash-loops on a node
with a damaged cache. Three outcomes:

1. the record opens and passes SQLite's ``quick_check``: use it;
2. it is *damaged* (malformed, not a database, truncated, a directory, unreadable): move it
   aside to ``chunks.db.damaged`` (replacing an older one, so repeated damage cannot fill the
   disk) and start an empty one. The chunk files must then go too: they are named by object and
   index, not by content, and their CRCs lived only in the record, so nothing vouches for their
   bytes any more (a machine crash that tore the record may have torn them as well);
3. it cannot be opened for writing for another reason (the disk is full or read-only): open
   it read-only and unchanging (``immutable=1``: no WAL, no shared memory, which a full disk
   refuses) so the chunks it lists are still served, CRC-checked as always, while new chunks
   are refused and read through; if even that fails, an empty in-memory record. Either way no
   chunk file is touched (a restart with room again finds them). A crash may have left newer
   commits in the WAL that this view misses: chunks named only there are read through, and a
   chunk it lists whose file was evicted since is found missing and read through; a chunk's
   name fixes its bytes, so its CRC in the main file is the right one.

A record from before one file per object lacks ``chunks.pos`` and ``objects``: opened for
writing it gains them (``_add_pos``); opened read-only it counts as unopenable (an empty
in-memory record: everything is read through until the disk lets the worker write again).

``quick_check`` reads every page of the record once, at each start: 1.0-1.7 s for 1,000,000
chunks (a 137 MB record, an 8 TB cache of 8 MiB chunks) on the loaded 2-core test machine, so
about 0.1 s for a 100,000-chunk cache; cheap next to a crash loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = (
    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    # ``pos``: where the chunk starts in its object's file (one file per object, see store).
    "CREATE TABLE IF NOT EXISTS chunks (name TEXT PRIMARY KEY, size INTEGER NOT NULL,"
    " crc INTEGER NOT NULL, used REAL NOT NULL, pos INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS chunks_used ON chunks (used);"
    # One row per object file: its size (to tell a complete object, which is only ever evicted
    # whole, from an incomplete one), whether the source's checksum vouched for it whole
    # (``checked``: objects too large to check before serving), and the file signature and
    # boot id under which every chunk of it last matched its CRC (``verified``; store_backing.py).
    "CREATE TABLE IF NOT EXISTS objects (oid TEXT PRIMARY KEY, size INTEGER NOT NULL,"
    " checked INTEGER NOT NULL DEFAULT 0, verified TEXT) WITHOUT ROWID;"
    # Chunks hard-linked into a direct tree (cache_worker.tree): never evicted, because
    # evicting a linked chunk frees no space and would make the tree disagree with us.
    "CREATE TABLE IF NOT EXISTS pins (name TEXT NOT NULL, tree TEXT NOT NULL, path TEXT NOT NULL,"
    " PRIMARY KEY (name, tree)) WITHOUT ROWID;"
)
_DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SIDE_FILES = ("-wal", "-shm")


class Damaged(Exception):
    """The record exists but cannot be trusted."""


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(exc, "errno", None) in (28, 122)


def is_damage(exc: BaseException) -> bool:
    """The record itself is bad (not the disk under it)."""
    return isinstance(exc, Damaged) or getattr(exc, "sqlite_errorcode", None) in _DAMAGE_CODES


def open_record(path: Path, mode: int) -> tuple[sqlite3.Connection, str, str | None]:
    """Open the record at ``path``: (connection, state, message).

    ``state`` is ``"ok"``, ``"rebuilt"`` (it was damaged and moved aside: the caller must drop
    every chunk file), ``"read-only"`` or ``"memory"`` (it could not be opened for writing: the
    caller must store nothing and touch no chunk file). ``message`` says what happened, for
    the log and ``degraded``.
    """
    try:
        return _open(path, mode), "ok", None
    except (sqlite3.Error, Damaged, OSError) as exc:
        if not _is_damage(path, exc):
            try:
                conn = _open_read_only(path)
            except (sqlite3.Error, Damaged, OSError):
                message = (f"cannot open the cache record {path} ({exc}): reading through to the source "
                           "without caching until the worker restarts")
                log.error(message)
                return _memory(), "memory", message
            message = (f"cannot open the cache record {path} for writing ({exc}): serving the chunks it "
                       "lists, reading the rest through to the source without caching until the worker restarts")
            log.error(message)
            return conn, "read-only", message
        damage = exc
    aside = path.with_name(path.name + ".damaged")
    log.error("the cache record %s is damaged (%s): moving it aside to %s and starting an empty "
              "cache; its chunk files cannot be checked without it and are dropped", path, damage, aside)
    try:
        _move_aside(path, aside)
        conn = _open(path, mode)
    except (sqlite3.Error, Damaged, OSError) as exc:
        message = (f"the cache record {path} is damaged ({damage}) and could not be replaced ({exc}): "
                   "reading through to the source without caching until the worker restarts")
        log.error(message)
        return _memory(), "memory", message
    return conn, "rebuilt", (f"the cache record {path} was damaged ({damage}); it was moved aside to "
                             f"{aside.name} and the cache started empty")


def _open(path: Path, mode: int) -> sqlite3.Connection:
    if not path.exists() and not path.is_symlink():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode))
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Damaged(f"{path} is not a regular file")
    for suffix in ("", *_SIDE_FILES):  # a record made under a laxer policy (allow_other before)
        side = Path(f"{path}{suffix}")
        if side.exists() and stat.S_IMODE(os.stat(side).st_mode) & ~mode:
            os.chmod(side, mode)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise Damaged("; ".join(str(r[0]) for r in rows[:3]))
        _add_pos(conn)
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _add_pos(conn: sqlite3.Connection) -> None:
    """A record of the chunk-file layout (before one file per object) lacks ``pos``: every
    chunk it lists was at the start of its own file, which is what the default says (the store
    moves or drops those files at start, ``ChunkStore._migrate``)."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(chunks)")]
    if columns and "pos" not in columns:
        conn.execute("ALTER TABLE chunks ADD COLUMN pos INTEGER NOT NULL DEFAULT 0")


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise Damaged(f"{path} is not a regular file")
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                           isolation_level=None)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise Damaged("; ".join(str(r[0]) for r in rows[:3]))
        conn.execute("SELECT name, size, crc, pos FROM chunks LIMIT 1").fetchall()
        conn.execute("SELECT oid, size, checked, verified FROM objects LIMIT 1").fetchall()
        conn.execute("SELECT name, tree, path FROM pins LIMIT 1").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


def _is_damage(path: Path, exc: BaseException) -> bool:
    if is_damage(exc):
        return True
    if is_disk_full(exc):
        return False
    try:  # CANTOPEN and the like: damage if the file itself is the problem, not the disk
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK | os.W_OK)


def _move_aside(path: Path, aside: Path) -> None:
    for suffix in ("", *_SIDE_FILES):
        src, dst = Path(f"{path}{suffix}"), Path(f"{aside}{suffix}")
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink(missing_ok=True)
        if src.exists() or src.is_symlink():
            os.replace(src, dst)


def _memory() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    conn.executescript(_SCHEMA)
    return conn
