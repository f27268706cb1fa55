"""HDFS as a :class:`~.source.Source`: what listing, stat, reads and checksums mean over WebHDFS.

The WebHDFS calls themselves (NameNode failover, error classification, deadlines) are
:mod:`.webhdfs`'s, the URI and the options :mod:`.hdfs_uri`'s; this module decides which calls
make an operation and retries each whole.

How each operation maps onto WebHDFS:

1. ``list``: a walk of the tree, several directories at a time, each read with
   ``LISTSTATUS_BATCH`` (``dfs.ls.limit`` entries per call, resumed with ``startAfter``), so a
   directory of a million files is never one huge response; servers older than Hadoop 2.8 fall
   back to ``LISTSTATUS``.
2. ``stat``: ``GETFILESTATUS``.
3. ``read``: ``OPEN`` with ``offset`` and ``length``; the NameNode answers 307 to a DataNode
   holding the block, which streams the bytes (HttpFS answers 200 with the bytes itself; both
   work). The DataNode verifies HDFS's block CRCs while it reads, but nothing protects the bytes
   on their way here (plain HTTP, proxies): :meth:`HdfsSource.evidence` gives the cache
   ``GETFILECHECKSUM`` (MD5 of the per-block MD5s of the per-512-byte CRC32Cs, which the
   DataNodes compute from their block metadata files, about 1/128 of the data) and the block
   size, and the cache checks every object whole against it before serving it (verify.py).
4. Versions: WebHDFS has no conditional read, so the ETag is ``fileId-length-modificationTime``
   and every read is followed by a ``GETFILESTATUS``: a file replaced, appended to or truncated
   before that check changes one of the three, and the read raises SourceChanged instead of
   returning bytes of another version. (One NameNode call per 8 MiB chunk or per small file.)

Each operation (a listing page, a stat, a read with its version check, a checksum) is retried
as a whole by :mod:`.retry`'s policy and by nothing else: one attempt goes once around the
NameNode list (:meth:`.webhdfs.WebHdfs.namenode_call`), so ``max_attempts=5`` is at most five
requests to each NameNode.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from .integrity import Check, Evidence, parse_hdfs_checksum
from .retry import RetryPolicy
from .source import (
    RemoteObject,
    Source,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourceTransientError,
)
from .hdfs_uri import HdfsOptions
from .webhdfs import WebHdfs

__all__ = ["HdfsOptions", "HdfsSource"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()  # end of a listing


class HdfsSource(Source):
    def __init__(self, uri: str, options: HdfsOptions | None = None) -> None:
        self.uri = uri
        self.options = options = options or HdfsOptions()
        self._client = WebHdfs(uri, options)
        self._retry = RetryPolicy(max_attempts=options.max_attempts, base_delay=0.05,
                                  deadline=options.retry_deadline)

    def _where(self, key: str = "") -> str:
        return self._client.where(key)

    def _json(self, op: str, key: str, params: dict[str, str] | None = None) -> dict:
        """A NameNode JSON operation, retried as a whole."""
        return self._retrying(self._where(key), lambda: self._client.json(op, key, params),
                              gone_is_changed=False)

    # -- Source -------------------------------------------------------------------------------
    def list(self) -> Iterator[RemoteObject]:
        """Walk the tree listing up to ``list_parallelism`` directories at once.

        A tree of many small directories (``year=/month=/day=/`` partitions, one directory per
        class) costs one NameNode round trip per directory, so they are listed concurrently;
        memory stays bounded by the queue of batches not yet consumed. Order is arbitrary.
        """
        workers = max(1, self.options.list_parallelism)
        results: queue.Queue = queue.Queue(maxsize=4 * workers)  # file batches, errors, _DONE
        directories: queue.Queue = queue.Queue()
        stop = threading.Event()
        lock = threading.Lock()
        pending = 1  # directories queued or being listed; the walk ends when none are left
        directories.put("")

        def deliver(item) -> None:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def walk() -> None:
            nonlocal pending
            while not stop.is_set():
                try:
                    prefix = directories.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    for batch in self._list_dir(prefix):
                        files = []
                        for status in batch:
                            if status.get("type") == "DIRECTORY":
                                with lock:
                                    pending += 1
                                directories.put(f"{prefix}{status['pathSuffix']}/")
                            elif status.get("type") == "FILE":
                                files.append(_remote_object(f"{prefix}{status['pathSuffix']}", status))
                        deliver(files)
                except SourceNotFound as exc:
                    if not prefix:
                        deliver(exc)
                    else:  # deleted while we walked: what is gone is not part of the dataset
                        log.warning("directory %s disappeared during listing", self._where(prefix))
                except Exception as exc:  # noqa: BLE001 - handed to the consumer
                    deliver(exc)
                finally:
                    with lock:
                        pending -= 1
                        done = pending == 0
                    if done:
                        deliver(_DONE)

        for n in range(workers):
            threading.Thread(target=walk, name=f"hdfs-list-{n}", daemon=True).start()
        try:
            while (item := results.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            stop.set()  # also when the consumer stops early: idle walkers exit within 0.1 s

    def _list_dir(self, prefix: str) -> Iterator[list[dict]]:
        """One directory's entries, in batches of the NameNode's ``dfs.ls.limit``."""
        key = prefix.rstrip("/")
        start_after: str | None = None
        while True:
            params = {"startAfter": start_after} if start_after is not None else None
            try:
                doc = self._json("LISTSTATUS_BATCH", key, params)
            except SourceError as exc:
                if "LISTSTATUS_BATCH" not in str(exc) or isinstance(exc, SourceTransientError):
                    raise  # only a refusal of the op by name means an old server
                # Hadoop < 2.8 rejects the op by name: one unbatched listing.
                doc = {"DirectoryListing": {"partialListing": self._json("LISTSTATUS", key)}}
            listing = doc["DirectoryListing"]
            entries = listing["partialListing"]["FileStatuses"]["FileStatus"]
            if any(not e.get("pathSuffix") for e in entries):
                raise SourceError(f"{self._where(key)} is a file, not a directory: name the "
                                  f"directory that holds it")
            yield entries
            if not entries or int(listing.get("remainingEntries", 0)) <= 0:
                return
            start_after = entries[-1]["pathSuffix"]

    def stat(self, key: str) -> RemoteObject:
        return self._retrying(self._where(key), lambda: self._stat_once(key), gone_is_changed=False)

    def _stat_once(self, key: str) -> RemoteObject:
        status = self._client.json("GETFILESTATUS", key)["FileStatus"]
        if status.get("type") != "FILE":
            raise SourceNotFound(f"not a file: {self._where(key)}")
        return _remote_object(key, status)

    def read(self, obj: RemoteObject, start: int, length: int) -> bytes:
        """OPEN at ``start`` for ``length`` bytes, retried as a whole, then checked against the listing."""
        if length <= 0:
            return b""
        where = self._where(obj.key)

        def once() -> bytes:
            data = self._read_once(obj, start, length, where)
            self._check_version(obj, where)
            if len(data) != length:
                raise SourceTransientError(
                    f"short read of {where}: got {len(data)} of {length} bytes at offset {start}")
            return data

        return self._retrying(where, once)

    def _retrying(self, where: str, call: Callable[[], T], *, gone_is_changed: bool = True) -> T:
        """``call``, one attempt of an operation, retried as a whole by the policy: the only
        retry loop on the HDFS path. With ``gone_is_changed``, a file gone since the listing
        is SourceChanged."""
        try:
            return self._retry.call(call, where)
        except SourceNotFound:
            if not gone_is_changed:
                raise
            raise SourceChanged(
                f"{where} was deleted since it was listed; remount with --refresh") from None

    def _read_once(self, obj: RemoteObject, start: int, length: int, where: str) -> bytes:
        limit = self._client.deadline()
        with limit:
            try:
                data = self._open_and_read(obj, start, length, where)
            except SourceTransientError:
                if limit.expired:
                    raise self._client.timed_out(f"HDFS read of {where}") from None
                raise
            if limit.expired:  # cut at the very end: the body may be short
                raise self._client.timed_out(f"HDFS read of {where}")
            return data

    def _open_and_read(self, obj: RemoteObject, start: int, length: int, where: str) -> bytes:
        return self._client.redirected("OPEN", obj.key, where, {"offset": str(start), "length": str(length)})

    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        """HDFS's MD5-of-MD5-of-CRC file checksum of ``obj`` and its block size.

        ``GETFILECHECKSUM`` is redirected to a DataNode, like OPEN. The version is checked
        after it, so a checksum of another version of the file is never used."""
        where = self._where(obj.key)
        if obj.size == 0:  # nothing that can be wrong but the length, which is checked
            return Evidence(Check("md5", hashlib.md5(b"", usedforsecurity=False).hexdigest(), "its length"))
        doc = self._retrying(where, lambda: self._client.redirected_json("GETFILECHECKSUM", obj.key, where))
        status = self._retrying(where, lambda: self._client.json("GETFILESTATUS", obj.key))["FileStatus"]
        now = _remote_object(obj.key, status)
        if obj.etag and now.etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed (was {obj.etag}, now "
                                f"{now.etag}); remount with --refresh")
        parsed = parse_hdfs_checksum(doc)
        block_size = int(status.get("blockSize") or 0)
        if parsed is None or block_size <= 0:
            algorithm = (doc.get("FileChecksum") or {}).get("algorithm")
            return Evidence(None, f"GETFILECHECKSUM answered {algorithm!r}, not an MD5-of-MD5-of-CRC")
        kind, per_crc, md5 = parsed
        return Evidence(Check(kind, md5, f"HDFS's {doc['FileChecksum']['algorithm']} file checksum",
                              block_size=block_size, bytes_per_crc=per_crc))

    def _check_version(self, obj: RemoteObject, where: str) -> None:
        now = self._stat_once(obj.key)  # part of the read's attempt: not retried on its own
        if obj.etag and now.etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed (was {obj.etag}, now "
                                f"{now.etag}); remount with --refresh")

    def close(self) -> None:
        self._client.close()


def _remote_object(key: str, status: dict) -> RemoteObject:
    length = int(status.get("length", 0))
    mtime_ms = int(status.get("modificationTime", 0))
    return RemoteObject(
        key=key,
        size=length,
        etag=f"{status.get('fileId', 0)}-{length}-{mtime_ms}",
        mtime=mtime_ms / 1000.0,
    )
