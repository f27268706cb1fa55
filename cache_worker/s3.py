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
their checks are retried as a whole. Every failure is classified once, in :func:`_classify` /
:func:`_classify_response`, into the source error kinds the worker (and the retry policy) act on.

Every attempt has a total deadline (``request_timeout``: connect, headers and the whole body,
see :mod:`.deadline`), so a store that drips a byte a second ends a chunk fetch, a listing page
or a HEAD like a silent one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.session
import urllib3
from botocore import UNSIGNED
from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)

from . import deadline, s3_get
from .retry import RetryPolicy
from .integrity import S3_ALGORITHMS, Check, Evidence, verify
from .source import (
    ChecksumMismatch,
    Fetched,
    RemoteObject,
    Source,
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)

log = logging.getLogger(__name__)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
#: Beyond this many parts a guessed layout that did not match is not looked up part by part.
_EXACT_PARTS_MAX = 1000
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_CHANGED_CODES = {"PreconditionFailed", "412", "NoSuchVersion"}
#: Worth another attempt (botocore's standard retry mode retries the same).
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "RequestTimeoutException",
}
_BODY_ERRORS = (
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    #: Unsigned requests and no credential lookup at all: not the environment, not
    #: ~/.aws, not instance metadata or a web identity (a Dataset's ``credentials: Anonymous``).
    anonymous: bool = False
    #: Attempts per request in all (the one retry loop is :mod:`.retry`'s; botocore's is off).
    max_attempts: int = 5
    #: Seconds after a request's first attempt past which no new attempt starts.
    retry_deadline: float | None = 300.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    #: Seconds one attempt of one request may take in all (connect, headers, whole body): an
    #: 8 MiB chunk in 60 s needs 140 KB/s from the store.
    request_timeout: float = 60.0
    max_connections: int = 64
    #: ``lean``: chunk GETs through :mod:`.s3_get`; ``botocore``: through botocore (the escape
    #: hatch, ``DATAHOARD_S3_CLIENT``).
    client: str = "lean"
    #: ``path``, ``virtual`` or ``auto`` (botocore's choice); None: path-style with an
    #: ``endpoint_url`` (every S3-compatible store takes it), else auto.
    addressing_style: str | None = None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``.

    A prefix always names a directory: ``s3://b/train`` means the keys under ``train/``, not
    every key that starts with ``train`` (``train2/...``), which is what users of s3fs, rclone
    and Fluid expect.
    """
    if not uri.startswith("s3://"):
        raise SourceError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix/)")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{0,254}", bucket):
        raise SourceError(f"invalid bucket name {bucket!r} in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _classify_code(code: str, message: str, what: str, endpoint: str) -> SourceError:
    """Turn an S3 error code (or the bare HTTP status) into one SourceError."""
    if code in _AUTH_CODES:
        return SourceAuthError(f"S3 rejected the credentials for {what}: {code}: {message}")
    if code in _DENIED_CODES:
        return SourcePermissionDenied(f"access denied to {what}: {message}")
    if code == "NoSuchBucket":
        return SourceNotFound(f"bucket does not exist: {what} (endpoint {endpoint})")
    if code in _MISSING_CODES:
        return SourceNotFound(f"not found: {what}")
    if code in _CHANGED_CODES:
        return SourceChanged(f"{what} changed since it was listed; remount with --refresh")
    return SourceTransientError(f"S3 error on {what}: {code}: {message}")


def _classify_response(status: int, code: str, message: str, what: str, endpoint: str) -> SourceError:
    """An S3 error answer as one SourceError; transient (retried) only when another attempt
    can get another answer: 429, 5xx or a throttling/5xx code, not some other 4xx."""
    error = _classify_code(code, message, what, endpoint)
    if type(error) is SourceTransientError and not (
        status in _RETRY_STATUSES or code in _RETRY_CODES
    ):
        return SourceError(str(error))
    return error


def _transport_error(exc: BaseException, what: str, endpoint: str) -> SourceError:
    """A lean GET that got no answer: unreachable before anything was sent, else the transfer
    broke (reset, timeout, short body); both retried."""
    if isinstance(exc, s3_get.CONNECT_ERRORS):
        return SourceUnreachable(f"cannot reach S3 endpoint {endpoint} for {what}: {_reason(exc)}")
    return SourceTransientError(f"S3 transfer of {what} failed: {_reason(exc)}")


def _classify(exc: Exception, what: str, endpoint: str) -> SourceError:
    """Turn a botocore failure into one SourceError with a message a person can act on."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return SourceAuthError(f"no S3 credentials found for {what}")
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return _classify_response(status, code, err.get("Message") or code, what, endpoint)
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError,
    ):
        return SourceUnreachable(f"cannot reach S3 endpoint {endpoint} for {what}: "
                                 f"{_unreachable_reason(exc)}")
    return SourceTransientError(f"S3 transfer of {what} failed: {exc}")


def _unreachable_reason(exc: BaseException) -> str:
    """Why botocore made no connection, in the words a person acts on ("connection refused",
    "connect timed out", "name or service not known"): its own message only repeats the
    request URL, and this text ends up in the Dataset's WorkersReady condition."""
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
        return "connect timed out"
    kwargs = getattr(exc, "kwargs", None)
    cause: BaseException | None = kwargs.get("error") if isinstance(kwargs, dict) else None
    for _ in range(5):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc)


class S3Source(Source):
    def __init__(self, uri: str, options: S3Options | None = None) -> None:
        self.uri = uri
        self.options = options = options or S3Options()
        self.bucket, self.prefix = parse_s3_uri(uri)
        core = botocore.session.get_session()
        session = boto3.session.Session(
            aws_access_key_id=options.access_key,
            aws_secret_access_key=options.secret_key,
            aws_session_token=options.session_token,
            region_name=options.region,
            botocore_session=core,
        )
        # get_credentials() walks the whole chain, instance metadata included: not when anonymous.
        credentials = None if options.anonymous else session.get_credentials()
        self._retry = RetryPolicy(max_attempts=options.max_attempts, deadline=options.retry_deadline)
        config = botocore.config.Config(
            # Ours retry (self._retry, around every call): botocore's would multiply them.
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            max_pool_connections=options.max_connections,
            # Path-style works with every S3-compatible store (MinIO, Ceph, moto); AWS
            # accepts it too. Virtual-host style is kept for AWS itself.
            s3={"addressing_style": options.addressing_style
                or ("path" if options.endpoint_url else "auto")},
            # The worker checks sizes and MD5s itself; botocore's extra response checksums cost
            # about 0.45 ms of CPU per request (bench/ANALYSIS.md).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # With no credentials anywhere in the chain, read public buckets anonymously.
            signature_version=UNSIGNED if credentials is None else None,
        )
        self._client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
        _bound_botocore_requests(self._client)
        self.endpoint = options.endpoint_url or self._client.meta.endpoint_url
        self._getter: s3_get.ObjectGetter | None = None
        lean = options.client != "botocore" and _no_proxy_for(self.endpoint)
        target = s3_get.resolve(self._client, self.bucket) if lean else None
        if target is not None:
            self._getter = s3_get.ObjectGetter(
                target=target,
                credentials=credentials,  # refreshed per request when refreshable
                max_connections=options.max_connections,
                connect_timeout=options.connect_timeout,
                read_timeout=options.read_timeout,
                request_timeout=options.request_timeout,
                ca_bundle=core.get_config_variable("ca_bundle")
                or botocore.httpsession.get_cert_path(True),
                # A bucket in another region than configured: AWS names it in its answer.
                target_for_region=None if options.endpoint_url else (
                    lambda region: s3_get.resolve(
                        session.client("s3", region_name=region, config=config), self.bucket)
                ),
            )

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
            raise _classify(exc, what, self.endpoint) from exc

    def list(self) -> Iterator[RemoteObject]:
        """Every current object, with its versionId when the bucket keeps versions.

        A versioned bucket (versioning Enabled or Suspended) is listed with ListObjectVersions,
        keeping the latest version of each key that is not deleted: reads then ask for that
        version, so an object overwritten after the listing is still served as listed. Without
        permission to ask (``s3:GetBucketVersioning``, ``s3:ListBucketVersions``) or versions,
        it is ListObjectsV2 and reads are pinned by ETag only."""
        if self._versioned():
            yield from self._list_versions()
        else:
            yield from self._list_objects()

    def _versioned(self) -> bool:
        try:
            answer = self._call("asking whether versions are kept for", self._where(), "get_bucket_versioning",
                                Bucket=self.bucket)
        except (SourcePermissionDenied, SourceAuthError, SourceNotFound) as exc:
            log.info("listing %s without versions: %s", self._where(), exc)
            return False
        except SourceError as exc:
            if "NotImplemented" in str(exc) or "MethodNotAllowed" in str(exc):
                return False
            raise
        return answer.get("Status") in ("Enabled", "Suspended")

    def _list_objects(self) -> Iterator[RemoteObject]:
        """ListObjectsV2 page by page, each page (each of its attempts) within the deadline."""
        token: str | None = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("listing", self._where(), "list_objects_v2", **kwargs)
            for item in page.get("Contents", ()):
                yield RemoteObject(
                    key=item["Key"][len(self.prefix) :],
                    size=int(item["Size"]),
                    etag=item.get("ETag", "").strip('"'),
                    mtime=item["LastModified"].timestamp(),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _list_versions(self) -> Iterator[RemoteObject]:
        """ListObjectVersions page by page: the latest version of every key (a key whose latest
        version is a delete marker is deleted). Version "null" (written while versioning was
        off or suspended) cannot be told from a later overwrite of it: read by ETag only."""
        markers: dict[str, str] = {}
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix, **markers}
            page = self._call("listing", self._where(), "list_object_versions", **kwargs)
            for item in page.get("Versions", ()):
                if not item.get("IsLatest"):
                    continue
                version = item.get("VersionId") or ""
                yield RemoteObject(
                    key=item["Key"][len(self.prefix) :],
                    size=int(item["Size"]),
                    etag=item.get("ETag", "").strip('"'),
                    mtime=item["LastModified"].timestamp(),
                    version="" if version == "null" else version,
                )
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page.get("NextKeyMarker", "")}
            if page.get("NextVersionIdMarker"):
                markers["VersionIdMarker"] = page["NextVersionIdMarker"]

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
        except _BODY_ERRORS as exc:
            raise SourceTransientError(f"S3 transfer of {where} failed: {exc}") from exc
        except ChecksumMismatch as exc:
            if self.on_mismatch is not None:
                self.on_mismatch(str(exc))
            raise
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors, classified once
            raise _classify(exc, where, self.endpoint) from exc

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
            raise _transport_error(exc, where, self.endpoint) from exc
        status = response.status
        data = response.data
        if status not in (200, 206):
            code, message = s3_get.parse_error(status, data)
            raise _classify_response(status, code, message, where, self.endpoint)
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
        if _is_md5_etag(obj.etag, response.headers, lower=True):
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest != obj.etag:
                raise ChecksumMismatch(f"checksum mismatch reading {where}: MD5 {digest}")
            return Fetched(data, True)
        return Fetched(data, _check_full_checksum(data, _checksum_headers(response.headers), where))

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
        if _is_md5_etag(obj.etag, response):
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest != obj.etag:
                raise ChecksumMismatch(f"checksum mismatch reading {where}: MD5 {digest}")
            return Fetched(data, True)
        return Fetched(data, _check_full_checksum(data, _checksum_fields(response), where))

    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        """The strongest whole-object check S3 offers for ``obj``, from one HEAD (two for a
        multipart object; one per part with ``exact``), in this order:

        1. the ETag, when it is the content's MD5 (single-part, not SSE-KMS / SSE-C);
        2. a FULL_OBJECT additional checksum (CRC32C, CRC32, SHA-256, SHA-1, CRC64NVME with the
           AWS CRT installed);
        3. the multipart ETag (not SSE-KMS / SSE-C), recomputed from the part layout: part 1's
           size and the part count from ``HEAD ?partNumber=1`` (``x-amz-mp-parts-count``),
           every part that size but the last (what every uploader we know does); ``exact``
           asks each part's size instead;
        4. a COMPOSITE additional checksum, recomputed from the same part layout.
        """
        where = self._where(obj.key)
        key = self.prefix + obj.key
        head = self._call("HEAD of", where, "head_object",
                          Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **self._version_of(obj))
        etag = head.get("ETag", "").strip('"')
        if obj.etag and etag != obj.etag:
            raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
        encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
            head.get("SSECustomerAlgorithm"))
        if not encrypted and _MD5_ETAG.match(etag):
            return Evidence(Check("md5", etag, "the MD5 ETag"))
        checksums = _checksum_fields(head)
        ctype = checksums.get("type", "")
        multipart = re.fullmatch(r"[0-9a-f]{32}-([0-9]+)", etag)
        # A checksum without a type is FULL_OBJECT on a single-part object; on a multipart one
        # it is ambiguous (moto's HEAD sends no type), so only a stated type is trusted there.
        full = ctype == "FULL_OBJECT" or (not ctype and not multipart)
        for algorithm in S3_ALGORITHMS:
            value = checksums.get(algorithm)
            if value and "-" not in value and full:
                return Evidence(Check(algorithm, value, f"its FULL_OBJECT {algorithm.upper()} checksum"))
        composite = next(((a, v) for a in S3_ALGORITHMS if (v := checksums.get(a))
                          and (ctype == "COMPOSITE" or "-" in v)), None)
        if not multipart:
            return Evidence(None, "SSE-KMS/SSE-C object without an S3 checksum" if encrypted
                            else f"ETag {etag!r} is not an MD5 and there is no S3 checksum")
        if encrypted and composite is None:
            return Evidence(None, "multipart SSE-KMS/SSE-C object without an S3 checksum")
        parts, guessed = self._part_sizes(obj, int(multipart.group(1)), exact, where)
        if parts is None:
            return Evidence(None, "its part layout could not be found")
        if not encrypted:
            return Evidence(Check("md5-parts", etag, f"its multipart ETag ({len(parts)} parts)",
                                  parts=parts, guessed=guessed))
        algorithm, value = composite
        return Evidence(Check(f"composite-{algorithm}", value.partition("-")[0],
                              f"its COMPOSITE {algorithm.upper()} checksum ({len(parts)} parts)",
                              parts=parts, guessed=guessed))

    def _part_sizes(self, obj: RemoteObject, count: int, exact: bool,
                    where: str) -> tuple[tuple[int, ...] | None, bool]:
        """(part sizes, guessed) of a multipart object of ``count`` parts, or (None, _)."""
        def part_size(number: int) -> tuple[int, int]:
            head = self._call("HEAD of", where, "head_object",
                              Bucket=self.bucket, Key=self.prefix + obj.key, PartNumber=number,
                              **self._version_of(obj))
            return int(head["ContentLength"]), int(head.get("PartsCount") or count)

        first, count = part_size(1)
        if count < 1 or first <= 0:
            return None, False
        if not exact:
            last = obj.size - (count - 1) * first
            if 0 < last <= first:
                return (first,) * (count - 1) + (last,), True
        if count > _EXACT_PARTS_MAX:
            return None, False
        sizes = (first,) + tuple(part_size(n)[0] for n in range(2, count + 1))
        return (sizes, False) if sum(sizes) == obj.size else (None, False)

    @staticmethod
    def _version_of(obj: RemoteObject) -> dict[str, str]:
        return {"VersionId": obj.version} if obj.version else {}

    def close(self) -> None:
        if self._getter is not None:
            self._getter.close()
        self._client.close()


class _BoundedHTTPConnection(deadline.CutOnDeadline, AWSHTTPConnection):
    pass


class _BoundedHTTPSConnection(deadline.CutOnDeadline, AWSHTTPSConnection):
    pass


class _BoundedHTTPConnectionPool(AWSHTTPConnectionPool):
    ConnectionCls = _BoundedHTTPConnection


class _BoundedHTTPSConnectionPool(AWSHTTPSConnectionPool):
    ConnectionCls = _BoundedHTTPSConnection


def _restart_clock(**_) -> None:
    """``before-send``: a request botocore sends again within one call (its S3 region
    redirector, after a 301/400 naming the bucket's region) gets the full time again."""
    limit = deadline.current()
    if limit is not None:
        limit.rearm()


def _bound_botocore_requests(client) -> None:
    """Make botocore's connections cuttable by :mod:`.deadline` (listing, HEAD, fallback GETs).

    botocore has no total-time limit per request and no public way to choose its connection
    classes; its HTTP session keeps them in one dict shared with every pool manager it makes
    (proxies included), filled before any pool exists. If a botocore release moves it, the
    calls keep working with per-``recv`` timeouts only, and the log says so.
    """
    classes = getattr(getattr(client._endpoint, "http_session", None), "_pool_classes_by_scheme", None)
    if not isinstance(classes, dict):
        log.warning("botocore's connection classes are not where expected: S3 listing and HEAD "
                    "have per-read timeouts only, no total deadline")
        return
    classes.update(http=_BoundedHTTPConnectionPool, https=_BoundedHTTPSConnectionPool)
    client.meta.events.register("before-send.s3", _restart_clock)


def _no_proxy_for(endpoint: str) -> bool:
    """Whether the lean path can reach ``endpoint``: not when an HTTP proxy is configured for
    it, which only botocore's session honours."""
    scheme, _, rest = endpoint.partition("://")
    host = rest.split("/", 1)[0]
    proxies = urllib.request.getproxies()
    return not (proxies.get(scheme) and not urllib.request.proxy_bypass(host))


def _reason(exc: BaseException) -> str:
    """urllib3 nests the useful part (refused, timed out, reset) in ``reason``."""
    reason = getattr(exc, "reason", None)
    return f"{exc.__class__.__name__}: {reason or exc}"


def _checksum_headers(headers) -> dict[str, str]:
    """``{algorithm: value}`` of the ``x-amz-checksum-<algorithm>`` response headers, plus
    ``type`` from ``x-amz-checksum-type``."""
    found = {a: headers.get(f"x-amz-checksum-{a}") for a in (*S3_ALGORITHMS, "type")}
    return {a: v for a, v in found.items() if v}


def _checksum_fields(response) -> dict[str, str]:
    """The same from botocore's parsed response (``ChecksumCRC32C``, ``ChecksumType``...)."""
    found = {a: response.get(f"Checksum{a.upper()}") for a in S3_ALGORITHMS}
    found["type"] = response.get("ChecksumType")
    return {a: str(v) for a, v in found.items() if v}


def _check_full_checksum(data: bytes, checksums: dict[str, str], where: str) -> bool:
    """True when a FULL_OBJECT checksum of the response matches ``data``; raises on a mismatch
    (retried); False when there is none we can recompute (COMPOSITE values, ``-n``, need the
    part layout: the cache checks those through ``evidence``)."""
    if checksums.get("type", "FULL_OBJECT") != "FULL_OBJECT":
        return False
    for algorithm in S3_ALGORITHMS:
        value = checksums.get(algorithm)
        if value and "-" not in value:
            if not verify(Check(algorithm, value, algorithm), len(data), (data,)):
                raise ChecksumMismatch(
                    f"checksum mismatch reading {where}: {algorithm.upper()} is not {value}")
            return True
    return False


def _is_md5_etag(etag: str, response, lower: bool = False) -> bool:
    """S3 ETags are the content MD5 only for single-part, non-KMS, non-SSE-C objects.

    ``response`` is botocore's parsed response, or (``lower``) the raw HTTP headers."""
    if not _MD5_ETAG.match(etag):
        return False
    if lower:
        sse = response.get("x-amz-server-side-encryption", "")
        sse_c = response.get("x-amz-server-side-encryption-customer-algorithm")
    else:
        sse = response.get("ServerSideEncryption", "")
        sse_c = response.get("SSECustomerAlgorithm")
    if sse.startswith("aws:kms") or sse_c:
        return False
    return True
