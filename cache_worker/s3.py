"""S3 and S3-compatible stores: listing and HEAD through boto3, chunk GETs through a lean path.

Chunk fetches are the hot path, and botocore's request pipeline costs about 3.5 ms of CPU per
GET in this single Python process, which capped cold reads and warming (bench/ANALYSIS.md).
So :meth:`S3Source.read` sends its ranged, ETag-pinned GETs with :mod:`.s3_get` (one urllib3
pool, botocore's SigV4 signer) and ``DATAHOARD_S3_CLIENT=botocore`` (or an HTTP proxy configured
for the endpoint, which only botocore honours) sends them through botocore as before.

Every request, chunk GET, listing page or HEAD, on either path, is retried by one loop only,
:mod:`.retry`'s policy (``max_attempts``, full-jitter backoff, ``retry_deadline``): botocore's
own retries are off (``total_max_attempts=1``), so the attempts a person sets are the requests
the store sees. Throttling, 5xx, connection errors, timeouts and bodies that break off or fail
their checks are retried as a whole. Every failure is classified once, in :mod:`.s3_errors`, into the source error kinds the worker
(and the retry policy) act on.

Every attempt has a total deadline (``request_timeout``: connect, headers and the whole body,
see :mod:`.deadline`), so a store that drips a byte a second ends a chunk fetch, a listing page
or a HEAD like a silent one.

The other jobs live beside this module: the botocore client, credentials and the lean getter
(:mod:`.s3_client`), listing with or without versions (:mod:`.s3_list`), what S3 says about
an object's content (:mod:`.s3_checks`) and error mapping (:mod:`.s3_errors`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import botocore.exceptions
import urllib3

from . import deadline, s3_get
from .integrity import Evidence
from .retry import RetryPolicy
from .s3_checks import check_full_checksum, checksum_fields, checksum_headers, evidence, is_md5_etag
from .s3_client import S3Options, connect, parse_s3_uri
from .s3_errors import BODY_ERRORS, classify, classify_response, transport_error
from .s3_list import list_prefix
from .source import (
    ChecksumMismatch,
    Fetched,
    RemoteObject,
    Source,
    SourceChanged,
    SourceError,
    SourceTransientError,
)

__all__ = ["S3Options", "S3Source"]

log = logging.getLogger(__name__)


class S3Source(Source):
    def __init__(self, uri: str, options: S3Options | None = None) -> None:
        self.uri = uri
        self.options = options = options or S3Options()
        self.bucket, self.prefix = parse_s3_uri(uri)
        self._retry = RetryPolicy(max_attempts=options.max_attempts, deadline=options.retry_deadline)
        connection = connect(self.bucket, options)
        self._client = connection.client
        self._getter = connection.getter
        self.endpoint = connection.endpoint

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _call(self, doing: str, what: str, operation: str, **kwargs) -> dict:
        """One botocore call on ``what``, retried by the policy, each attempt (one request:
        botocore's retries are off) bounded by ``request_timeout`` in all."""
        return self._retry.call(lambda: self._call_once(doing, what, operation, kwargs), what)

    def _call_once(self, doing: str, what: str, operation: str, kwargs: dict) -> dict:
        limit = deadline.Deadline(self.options.request_timeout, setting="DATAHOARD_S3_REQUEST_TIMEOUT")
        try:
            with limit:
                return getattr(self._client, operation)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if limit.fired:  # whatever botocore made of the cut connection: it timed out
                raise SourceTransientError(
                    f"{doing} {what} timed out: S3 sent no complete answer in "
                    f"{self.options.request_timeout:g} s (DATAHOARD_S3_REQUEST_TIMEOUT)") from exc
            if isinstance(exc, botocore.exceptions.ReadTimeoutError):
                raise SourceTransientError(
                    f"{doing} {what} timed out: S3 sent nothing for "
                    f"{self.options.read_timeout:g} s (DATAHOARD_S3_READ_TIMEOUT)") from exc
            raise classify(exc, what, self.endpoint) from exc

    def list(self) -> Iterator[RemoteObject]:
        """Every current object, by version when the bucket keeps versions (:mod:`.s3_list`)."""
        return list_prefix(self._call, self.bucket, self.prefix, self._where())

    def stat(self, key: str) -> RemoteObject:
        head = self._call("HEAD of", self._where(key), "head_object",
                          Bucket=self.bucket, Key=self.prefix + key)
        return RemoteObject(
            key=key,
            size=int(head["ContentLength"]),
            etag=head.get("ETag", "").strip('"'),
            mtime=head["LastModified"].timestamp(),
        )

    def read(self, obj: RemoteObject, start: int, length: int) -> bytes:
        return self.fetch(obj, start, length).data

    def fetch(self, obj: RemoteObject, start: int, length: int) -> Fetched:
        """Ranged GET pinned to the listed ETag, retried as a whole by the policy.

        Throttling, 5xx, unreachable endpoints, timeouts, broken or short bodies and checksum
        mismatches are retried, ``max_attempts`` in total (nothing retries underneath, on
        either path); the error that outlives them names the object. A whole-object GET asks
        for the stored checksum (``x-amz-checksum-mode: ENABLED``) and is ``verified`` when
        the MD5 ETag or a FULL_OBJECT checksum matched; ranges never are (S3 sends no checksum
        for a range), the cache checks them through :meth:`evidence`."""
        if length <= 0:
            return Fetched(b"", True)
        where = self._where(obj.key)
        return self._retry.call(lambda: self._fetch_once(obj, start, length, where), where)

    def _fetch_once(self, obj: RemoteObject, start: int, length: int, where: str) -> Fetched:
        """One attempt; every failure leaves as a classified SourceError."""
        try:
            return self._read_once(obj, start, length, where)
        except BODY_ERRORS as exc:
            raise SourceTransientError(f"S3 transfer of {where} failed: {exc}") from exc
        except ChecksumMismatch as exc:
            if self.on_mismatch is not None:
                self.on_mismatch(str(exc))
            raise
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors, classified once
            raise classify(exc, where, self.endpoint) from exc

    def _read_once(self, obj: RemoteObject, start: int, length: int, where: str) -> Fetched:
        if self._getter is None:
            limit = deadline.Deadline(self.options.request_timeout, setting="DATAHOARD_S3_REQUEST_TIMEOUT")
            try:
                with limit:
                    return self._read_once_botocore(obj, start, length, where)
            except Exception as exc:
                if limit.fired:
                    raise SourceTransientError(
                        f"S3 transfer of {where} failed: {limit.error()}") from exc
                raise
        whole = start == 0 and length == obj.size
        headers = {}
        if not whole:
            headers["range"] = f"bytes={start}-{start + length - 1}"
        else:
            headers["x-amz-checksum-mode"] = "ENABLED"
        if obj.etag:
            headers["if-match"] = f'"{obj.etag}"'
        try:
            response = self._getter.get(self.prefix + obj.key, headers, version=obj.version)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise transport_error(exc, where, self.endpoint) from exc
        status = response.status
        data = response.data
        if status not in (200, 206):
            code, message = s3_get.parse_error(status, data)
            raise classify_response(status, code, message, where, self.endpoint)
        got_etag = response.headers.get("etag", "").strip('"')
        if obj.etag and got_etag and got_etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
        if status == 206:
            content_range = response.headers.get("content-range", "")
            if not content_range.startswith(f"bytes {start}-{start + length - 1}/"):
                raise SourceTransientError(
                    f"S3 answered {where} with range {content_range!r}, "
                    f"not bytes {start}-{start + length - 1}"
                )
            if content_range.rpartition("/")[2] not in (str(obj.size), "*"):
                raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
        elif not whole and len(data) == obj.size:  # a store that ignored Range sent it all
            data = data[start : start + length]
        if len(data) != length:
            raise SourceTransientError(
                f"short read of {where}: got {len(data)} of {length} bytes at offset {start}"
            )
        if not whole or status != 200:
            return Fetched(data, False)
        if is_md5_etag(obj.etag, response.headers, lower=True):
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest != obj.etag:
                raise ChecksumMismatch(f"checksum mismatch reading {where}: MD5 {digest}")
            return Fetched(data, True)
        return Fetched(data, check_full_checksum(data, checksum_headers(response.headers), where))

    def _read_once_botocore(self, obj: RemoteObject, start: int, length: int, where: str) -> Fetched:
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + obj.key}
        whole = start == 0 and length == obj.size
        if not whole:
            kwargs["Range"] = f"bytes={start}-{start + length - 1}"
        else:
            kwargs["ChecksumMode"] = "ENABLED"
        if obj.etag:
            kwargs["IfMatch"] = f'"{obj.etag}"'
        if obj.version:
            kwargs["VersionId"] = obj.version
        response = self._client.get_object(**kwargs)
        body = response["Body"]
        try:
            data = body.read()
        except botocore.exceptions.FlexibleChecksumError as exc:  # botocore checked it itself
            raise ChecksumMismatch(f"checksum mismatch reading {where}: {exc}") from exc
        finally:
            body.close()
        got_etag = response.get("ETag", "").strip('"')
        if obj.etag and got_etag and got_etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
        if len(data) != length:
            raise SourceTransientError(
                f"short read of {where}: got {len(data)} of {length} bytes at offset {start}"
            )
        if not whole:
            return Fetched(data, False)
        if is_md5_etag(obj.etag, response):
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest != obj.etag:
                raise ChecksumMismatch(f"checksum mismatch reading {where}: MD5 {digest}")
            return Fetched(data, True)
        return Fetched(data, check_full_checksum(data, checksum_fields(response), where))

    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        """The strongest whole-object check S3 offers for ``obj`` (:func:`.s3_checks.evidence`)."""
        return evidence(self._call, self.bucket, self.prefix + obj.key, obj, exact, self._where(obj.key))

    def close(self) -> None:
        if self._getter is not None:
            self._getter.close()
        self._client.close()
