"""A snapshot: one listing of the source, in a canonical form, named by its content hash.

Every node of a Dataset must serve the same file set. Listing the source on each node gives
each node whatever the bucket held at that moment, so the listing is made once and shipped:
a worker that lists writes the snapshot into its cache directory and serves it
(``GET /snapshot/<id>`` on its stats endpoint, :mod:`.stats_server`); a worker given
``--snapshot-id`` and ``--snapshot-from`` fetches it from a peer instead of listing. In both
cases the index (:mod:`.index`) is built *from the snapshot file*, by the same code, so equal
ids mean equal views.

The canonical form, hashed with SHA-256 (the id is the hex digest):

* line 1: ``{"datahoard_snapshot":1,"source":"<uri>"}``
* then one line per listed object, sorted by key (code point order, which is UTF-8 byte order):
  ``["<key>",<size>,"<etag>","<version>",<mtime>]`` in compact JSON (``ensure_ascii=False``;
  a newline inside a key is escaped, so a line is an object). ``version`` is the S3 versionId
  or the HDFS version string where the listing has one, else ``""``.

It is the raw listing (before ``--include``/``--exclude`` and the key rules), so a receiver
applies the Dataset's own filter, as the lister did. The file is stored gzip-compressed
(``snapshot-<id>.jsonl.gz``) and served as stored: a peer sends bytes, the receiver recomputes
the hash over what it decompressed and refuses anything else (a peer cannot feed it another
listing), and nothing from a refused snapshot is kept.

Sorting a million keys in Python would hold them all in memory (about 250 MB of objects);
the listing is sorted by SQLite in a scratch file instead (bounded memory).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .source import RemoteObject

log = logging.getLogger(__name__)

FORMAT = 1
ID_PATTERN = re.compile(r"[0-9a-f]{64}")
#: gzip level 1: 4-5x smaller than the text at a fraction of level 6's time; the listing is
#: written once per Dataset and the wire is rarely the bottleneck inside a cluster.
_LEVEL = 1
_READ = 1 << 20


class SnapshotError(Exception):
    """A snapshot cannot be used; the message says which and why."""


def file_name(snapshot_id: str) -> str:
    return f"snapshot-{snapshot_id}.jsonl.gz"


def check_id(snapshot_id: str) -> str:
    if not ID_PATTERN.fullmatch(snapshot_id or ""):
        raise SnapshotError(f"snapshot id {snapshot_id!r} is not a snapshot id (64 hex digits, "
                            "as `datahoard status` and the Dataset's status.snapshot show it)")
    return snapshot_id


#: One encoder for every line: ``json.dumps`` with options builds a new one per call, which
#: was a third of the time of writing a snapshot.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _header(source: str) -> bytes:
    return (_encode({"datahoard_snapshot": FORMAT, "source": source}) + "\n").encode()


def _line(key: str, size: int, etag: str, version: str, mtime: float) -> str:
    return _encode([key, size, etag, version, mtime])


def write(objects: Iterable[RemoteObject], source: str, directory: Path,
          progress: Callable[[int], None] | None = None) -> tuple[str, Path, int]:
    """List ``objects`` into a snapshot file in ``directory``: (id, path, entries)."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / "snapshot-sort.db"
    part = directory / "snapshot.part"
    for leftover in (scratch, part):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(scratch)
    try:
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;"
                           "CREATE TABLE l (key TEXT, size INTEGER, etag TEXT, version TEXT, mtime REAL)")
        batch: list[tuple] = []
        count = 0
        for obj in objects:
            batch.append((obj.key, obj.size, obj.etag, obj.version, obj.mtime))
            if len(batch) >= 5000:
                conn.executemany("INSERT INTO l VALUES (?,?,?,?,?)", batch)
                count += len(batch)
                batch.clear()
                if progress:
                    progress(count)
        conn.executemany("INSERT INTO l VALUES (?,?,?,?,?)", batch)
        count += len(batch)
        if progress:
            progress(count)
        digest = hashlib.sha256()
        with open(part, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_LEVEL,
                                                    mtime=0) as out:
            head = _header(source)
            digest.update(head)
            out.write(head)
            # BINARY collation compares UTF-8 bytes: the same order as Python's str sort.
            rows = conn.execute("SELECT key, size, etag, version, mtime FROM l ORDER BY key")
            while batch := rows.fetchmany(4096):
                chunk = ("\n".join([_line(*row) for row in batch]) + "\n").encode()
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        conn.close()
        scratch.unlink(missing_ok=True)
    snapshot_id = digest.hexdigest()
    path = directory / file_name(snapshot_id)
    os.replace(part, path)
    return snapshot_id, path, count


def _decompressed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """gunzip a stream of compressed chunks (multi-member safe)."""
    d = zlib.decompressobj(wbits=31)
    for chunk in chunks:
        while chunk:
            out = d.decompress(chunk)
            if out:
                yield out
            if d.eof:
                chunk = d.unused_data
                d = zlib.decompressobj(wbits=31)
            else:
                chunk = b""
    if not d.eof and (tail := d.flush()):
        yield tail


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            yield chunk


def read(path: Path, snapshot_id: str, source: str) -> Iterator[RemoteObject]:
    """The objects of the snapshot file at ``path``, checked as they are read.

    The hash is known only at the end: the last step of the iteration raises SnapshotError if
    it is not ``snapshot_id`` (a consumer must not keep anything before the iteration ends,
    as ``build_index`` builds into a scratch file). The header must name ``source``."""
    digest = hashlib.sha256()
    pending = b""
    header: dict | None = None
    try:
        for data in _decompressed(_file_chunks(path)):
            digest.update(data)
            data = pending + data
            cut = data.rfind(b"\n")
            if cut < 0:
                pending = data
                continue
            body, pending = data[:cut], data[cut + 1:]
            if header is None:
                first, _, body = body.partition(b"\n")
                header = _check_header(first, source, path)
                if not body:
                    continue
            # A raw newline never occurs inside a line (JSON escapes it), so the lines of a
            # chunk are one JSON array: one parse per chunk instead of one per object (4x faster).
            for key, size, etag, version, mtime in json.loads(b"[" + body.replace(b"\n", b",") + b"]"):
                yield RemoteObject(key, size, etag, mtime, version)
    except (zlib.error, EOFError, ValueError, TypeError) as exc:
        raise SnapshotError(f"snapshot {path.name} is corrupt: {exc}") from None
    if pending or header is None:
        raise SnapshotError(f"snapshot {path.name} is truncated")
    if digest.hexdigest() != snapshot_id:
        raise SnapshotError(f"snapshot {path.name} hashes to {digest.hexdigest()}, not {snapshot_id}: "
                            "refused")


def _check_header(line: bytes, source: str, path: Path) -> dict:
    header = json.loads(line)
    if not isinstance(header, dict) or header.get("datahoard_snapshot") != FORMAT:
        raise SnapshotError(f"{path.name} is not a datahoard snapshot of format {FORMAT}")
    if header.get("source") != source:
        raise SnapshotError(f"snapshot {path.name} lists {header.get('source')!r}, not {source!r}: "
                            "it belongs to another dataset")
    return header


def verify_file(path: Path, snapshot_id: str) -> None:
    """Raise SnapshotError unless the file at ``path`` decompresses to bytes hashing to the id."""
    digest = hashlib.sha256()
    try:
        for data in _decompressed(_file_chunks(path)):
            digest.update(data)
    except (zlib.error, EOFError) as exc:
        raise SnapshotError(f"not a gzip stream: {exc}") from None
    if digest.hexdigest() != snapshot_id:
        raise SnapshotError(f"it hashes to {digest.hexdigest()}, not {snapshot_id}")


def fetch(peers: Iterable[str], snapshot_id: str, directory: Path, timeout: float = 30.0,
          deadline: float = 600.0) -> Path:
    """Download snapshot ``snapshot_id`` from the first peer that serves it (a worker's stats
    URL, ``http://host:port``), verify it, and store it in ``directory``.

    Each peer is tried once; a request gives up after ``timeout`` seconds without progress or
    ``deadline`` seconds in all.
    A file that does not hash to the id is deleted and the next peer tried; when none serves
    it, SnapshotError names every peer and what went wrong with it."""
    check_id(snapshot_id)
    peers = [p.rstrip("/") for p in peers if p.strip()]
    if not peers:
        raise SnapshotError(f"snapshot {snapshot_id}: no peer to fetch it from (--snapshot-from)")
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / file_name(snapshot_id)
    part = directory / "snapshot.download"
    problems = []
    for peer in peers:
        url = f"{peer}/snapshot/{snapshot_id}"
        part.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
                while chunk := resp.read(_READ):
                    out.write(chunk)
                    if time.monotonic() - started > deadline:
                        raise TimeoutError(f"not complete after {deadline:g} s")
            verify_file(part, snapshot_id)
        except urllib.error.HTTPError as exc:
            problems.append(f"{url}: HTTP {exc.code}" + (" (it does not hold that snapshot)"
                                                         if exc.code == 404 else ""))
        except (OSError, urllib.error.URLError) as exc:
            problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
        except SnapshotError as exc:
            log.error("refusing the snapshot from %s: %s", url, exc)
            problems.append(f"{url}: refused, {exc}")
        else:
            os.replace(part, dest)
            log.info("fetched snapshot %s from %s (%d bytes) in %.2f s", snapshot_id, peer,
                     dest.stat().st_size, time.monotonic() - started)
            return dest
        finally:
            part.unlink(missing_ok=True)
    raise SnapshotError(f"cannot get snapshot {snapshot_id} from any peer: " + "; ".join(problems))


def remove_others(directory: Path, keep: str) -> None:
    """Delete snapshot files other than ``keep``'s (a new snapshot replaced them)."""
    for path in directory.glob("snapshot-*.jsonl.gz"):
        if path.name != file_name(keep):
            path.unlink(missing_ok=True)
