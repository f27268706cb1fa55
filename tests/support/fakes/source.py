"""An S3-like store in memory (:class:`FakeS3`) and the :class:`~cache_worker.source.Source`
that reads it (:class:`FakeSource`), keeping the contract :class:`S3Source` keeps over HTTP:

* ``list`` yields every key under the prefix (a directory: ``s3://b/train`` is ``train/``),
  relative to it, with size, ETag and mtime; a missing bucket is SourceNotFound.
* ``read``/``fetch`` is a GET pinned to the listed ETag (``If-Match``): an object replaced
  since it was listed is SourceChanged, a deleted one SourceNotFound. A whole-object read of an
  object whose ETag is its MD5 checks the bytes in-band (``verified``); a mismatch is retried
  and reported to ``on_mismatch``, and outliving the attempts is ChecksumMismatch. Ranges are
  never verified: whatever the wire did to them arrives.
* ``evidence`` is what a HEAD says: the MD5 ETag, or a multipart ETag with its part layout
  (guessed from part 1 and the part count, exact with ``exact=True``), exactly as S3Source.
* Transient faults (throttling, an unreachable endpoint) are retried ``max_attempts`` times in
  all, then raised; permanent ones never are. No sleeping: retries are immediate.

The store side lets a test do what S3 or the network would: put, overwrite and delete objects,
corrupt the next responses in transit, fail the next requests, refuse every connection
(``reachable=False``); :attr:`FakeS3.requests` records
every request, so a test can tell a hit (no GET) from a miss.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from datahoard.cache_worker.integrity import Check, Evidence
from datahoard.cache_worker.s3_client import parse_s3_uri
from datahoard.cache_worker.source import (
    ChecksumMismatch,
    Fetched,
    RemoteObject,
    Source,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourceTransientError,
    SourceUnreachable,
)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
ENDPOINT = "fake-s3://memory"


def multipart_etag(data: bytes, part_size: int) -> tuple[str, tuple[int, ...]]:
    """The ETag S3 gives ``data`` uploaded in parts of ``part_size`` (the last may be smaller)."""
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)] or [b""]
    digests = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
    return (f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}",
            tuple(len(p) for p in parts))


@dataclass
class StoredObject:
    data: bytes
    etag: str
    mtime: float
    parts: tuple[int, ...] = ()  # part sizes of a multipart upload; () for a single PUT


@dataclass
class Request:
    """One request that reached the store: ``op`` is LIST, HEAD or GET."""

    op: str
    bucket: str
    key: str = ""
    start: int = 0
    length: int = 0


@dataclass
class _Faults:
    corrupt: int = 0
    fail: int = 0
    fail_kind: str = "transient"


@dataclass
class FakeS3:
    """Buckets of objects in memory, as a store holds them; thread-safe."""

    buckets: dict[str, dict[str, StoredObject]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: False: the endpoint refuses connections (every request is SourceUnreachable).
    reachable: bool = True
    _faults: dict[tuple[str, str], _Faults] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what a user of the store does ---------------------------------------------------------
    def create_bucket(self, bucket: str) -> None:
        with self._lock:
            self.buckets.setdefault(bucket, {})

    def put(self, bucket: str, key: str, data: bytes, part_size: int | None = None) -> str:
        """PUT (or, with ``part_size``, a multipart upload of) ``data``; returns the ETag."""
        if part_size is None:
            etag, parts = hashlib.md5(data, usedforsecurity=False).hexdigest(), ()
        else:
            etag, parts = multipart_etag(data, part_size)
        with self._lock:
            if bucket not in self.buckets:
                raise KeyError(f"no bucket {bucket}")
            self.buckets[bucket][key] = StoredObject(bytes(data), etag, time.time(), parts)
        return etag

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            self.buckets[bucket].pop(key, None)

    # -- what the network does -----------------------------------------------------------------
    def corrupt_next(self, bucket: str, key: str, times: int = 1) -> None:
        """Flip one byte of the next ``times`` GET answers of ``key`` on their way to us."""
        with self._lock:
            self._faults.setdefault((bucket, key), _Faults()).corrupt += times

    def fail_next(self, bucket: str, key: str, times: int = 1, kind: str = "transient") -> None:
        """The next ``times`` GETs of ``key`` fail: ``transient`` (503 SlowDown) or
        ``unreachable`` (connection refused)."""
        with self._lock:
            faults = self._faults.setdefault((bucket, key), _Faults())
            faults.fail, faults.fail_kind = faults.fail + times, kind

    def gets(self, key: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.op == "GET" and (key is None or r.key == key)]

    # -- the server side -----------------------------------------------------------------------
    def _bucket(self, bucket: str, where: str) -> dict[str, StoredObject]:
        if not self.reachable:
            raise SourceUnreachable(f"cannot reach S3 endpoint {ENDPOINT} for {where}: "
                                    "connection refused")
        found = self.buckets.get(bucket)
        if found is None:
            raise SourceNotFound(f"bucket does not exist: {where} (endpoint {ENDPOINT})")
        return found

    def list(self, bucket: str, prefix: str, where: str) -> list[tuple[str, StoredObject]]:
        with self._lock:
            self.requests.append(Request("LIST", bucket, prefix))
            objects = self._bucket(bucket, where)
            return sorted((k, o) for k, o in objects.items() if k.startswith(prefix))

    def head(self, bucket: str, key: str, where: str) -> StoredObject:
        with self._lock:
            self.requests.append(Request("HEAD", bucket, key))
            obj = self._bucket(bucket, where).get(key)
            if obj is None:
                raise SourceNotFound(f"not found: {where}")
            return obj

    def get(self, bucket: str, key: str, start: int, length: int, if_match: str,
            where: str) -> tuple[bytes, StoredObject]:
        """One GET of ``[start, start + length)``; raises what the answer means."""
        with self._lock:
            self.requests.append(Request("GET", bucket, key, start, length))
            self._bucket(bucket, where)  # reachable at all?
            faults = self._faults.get((bucket, key))
            if faults is not None and faults.fail:
                faults.fail -= 1
                if faults.fail_kind == "unreachable":
                    raise SourceUnreachable(f"cannot reach S3 endpoint {ENDPOINT} for {where}: "
                                            "connection refused")
                raise SourceTransientError(f"S3 error on {where}: SlowDown: Please reduce your request rate.")
            obj = self._bucket(bucket, where).get(key)
            if obj is None:
                raise SourceNotFound(f"not found: {where}")
            if if_match and obj.etag != if_match:
                raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
            if start >= len(obj.data) and len(obj.data):
                raise SourceError(f"S3 error on {where}: InvalidRange: The requested range is not satisfiable")
            data = obj.data[start : start + length]
            if faults is not None and faults.corrupt and data:
                faults.corrupt -= 1
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            return data, obj


class FakeSource(Source):
    """A :class:`Source` over ``s3://bucket/prefix`` in a :class:`FakeS3`."""

    def __init__(self, store: FakeS3, uri: str, max_attempts: int = 3) -> None:
        self.store = store
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.max_attempts = max_attempts
        self.closed = False

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _retried(self, attempt):
        """``attempt()`` up to ``max_attempts`` times while it fails transiently (as RetryPolicy)."""
        for n in range(1, self.max_attempts + 1):
            try:
                return attempt()
            except (SourceTransientError, SourceUnreachable):
                if n == self.max_attempts:
                    raise
        raise AssertionError("unreachable")

    def list(self) -> Iterator[RemoteObject]:
        for key, obj in self.store.list(self.bucket, self.prefix, self._where()):
            yield RemoteObject(key=key[len(self.prefix):], size=len(obj.data), etag=obj.etag,
                               mtime=obj.mtime)

    def stat(self, key: str) -> RemoteObject:
        obj = self.store.head(self.bucket, self.prefix + key, self._where(key))
        return RemoteObject(key=key, size=len(obj.data), etag=obj.etag, mtime=obj.mtime)

    def read(self, obj: RemoteObject, start: int, length: int) -> bytes:
        return self.fetch(obj, start, length).data

    def fetch(self, obj: RemoteObject, start: int, length: int) -> Fetched:
        if length <= 0:
            return Fetched(b"", True)
        where = self._where(obj.key)
        return self._retried(lambda: self._fetch_once(obj, start, length, where))

    def _fetch_once(self, obj: RemoteObject, start: int, length: int, where: str) -> Fetched:
        data, stored = self.store.get(self.bucket, self.prefix + obj.key, start, length, obj.etag, where)
        if len(data) != length:
            raise SourceTransientError(
                f"short read of {where}: got {len(data)} of {length} bytes at offset {start}")
        if not (start == 0 and length == obj.size) or not _MD5_ETAG.match(stored.etag):
            return Fetched(data, False)
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != obj.etag:
            error = ChecksumMismatch(f"checksum mismatch reading {where}: MD5 {digest}")
            if self.on_mismatch is not None:
                self.on_mismatch(str(error))
            raise error
        return Fetched(data, True)

    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        where = self._where(obj.key)
        stored = self.store.head(self.bucket, self.prefix + obj.key, where)
        if obj.etag and stored.etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
        if _MD5_ETAG.match(stored.etag):
            return Evidence(Check("md5", stored.etag, "the MD5 ETag"))
        parts = stored.parts
        guessed = False
        if not exact:  # what S3Source infers from HEAD ?partNumber=1
            first, count = parts[0], len(parts)
            last = obj.size - (count - 1) * first
            if 0 < last <= first:
                parts, guessed = (first,) * (count - 1) + (last,), True
        return Evidence(Check("md5-parts", stored.etag, f"its multipart ETag ({len(parts)} parts)",
                              parts=parts, guessed=guessed))

    def close(self) -> None:
        self.closed = True
