"""A lean S3 GET: one urllib3 connection pool and SigV4 header signing, no botocore pipeline.

Chunk fetches are the worker's hot path. Through botocore one ``get_object`` plus its body costs
3.5-4 ms of CPU (request pipeline, event hooks, ``uuid4``, user-agent building, checksum
plumbing), which caps a single worker process at about 260 fetches/s (bench/ANALYSIS.md). The
same request here is a URL, a handful of headers and two HMACs.

This module only *transports*: it builds, signs and sends one GET and returns the response with
its body read, all of it (connect, headers, body) within ``request_timeout`` seconds
(:mod:`.deadline`: a store that drips its body a byte at a time is cut off, not waited for). Deciding what a status means, retrying and verifying the bytes is
:class:`cache_worker.s3.S3Source`'s job. Listing and HEAD stay on botocore.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import urllib3

from . import deadline

_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_USER_AGENT = "datahoard"
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9\-]{1,61}[a-z0-9]$")
_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")

#: Errors raised before anything reached the server: the endpoint is unreachable.
CONNECT_ERRORS = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.NameResolutionError,
)


class SigV4Signer:
    """AWS Signature Version 4 for S3 requests with an unsigned payload, headers only.

    The signing key depends on the secret, the date and the region only, so it is derived once
    per day instead of four HMACs per request.
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key: tuple[str, str, bytes] | None = None  # (secret, yyyymmdd, key)

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == secret and cached[1] == day:
            return cached[2]
        key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
        for part in (self.region, self.service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        self._key = (secret, day, key)  # one tuple swap: safe to share between threads
        return key

    def sign(self, method: str, path: str, headers: dict[str, str], access_key: str,
             secret_key: str, token: str | None, now: float | None = None) -> None:
        """Add ``x-amz-*`` and ``Authorization`` to ``headers`` (lower-case names, with
        ``host``) for a request to ``path`` (already URI-encoded, no query string)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        headers["x-amz-content-sha256"] = _UNSIGNED_PAYLOAD
        headers["x-amz-date"] = stamp
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join((
            method,
            path,
            "",  # no query string
            "".join(f"{name}:{headers[name].strip()}\n" for name in names),
            signed,
            _UNSIGNED_PAYLOAD,
        ))
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join((
            "AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()
        ))
        signature = hmac.new(self._signing_key(secret_key, day), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )


class ObjectGetter:
    """Signed GETs of one bucket's objects through one shared, thread-safe connection pool.

    Addressing follows what the botocore client resolves: with an explicit endpoint URL
    (MinIO, Ceph, ...) path-style ``{endpoint}/{bucket}/{key}``; on AWS virtual-host style
    ``https://{bucket}.{client endpoint host}/{key}``, falling back to path-style for bucket
    names that cannot be a TLS host name (dots, underscores), as botocore's "auto" does.
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str,
        region: str,
        path_style: bool,
        credentials: object | None,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        request_timeout: float = 60.0,
        ca_bundle: str | None = None,
        endpoint_for_region: Callable[[str], str] | None = None,
    ) -> None:
        self.bucket = bucket
        self._path_style = path_style
        self._credentials = credentials  # botocore Credentials (maybe refreshable) or None
        self._max_connections = max(1, max_connections)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._request_timeout = request_timeout
        self._ca_bundle = ca_bundle
        self._endpoint_for_region = endpoint_for_region
        self._lock = threading.Lock()
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._target(endpoint_url, region)

    # -- addressing ---------------------------------------------------------------------------
    def _target(self, endpoint_url: str, region: str) -> None:
        parts = urlsplit(endpoint_url)
        scheme = parts.scheme or "https"
        host = parts.hostname or ""
        base = parts.path.rstrip("/")
        virtual = (not self._path_style and _DNS_BUCKET.match(self.bucket) is not None)
        if virtual:
            host = f"{self.bucket}.{host}"
            prefix = base + "/"
        else:
            prefix = f"{base}/{quote(self.bucket, safe='')}/"
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        if ":" in host:  # IPv6 literal
            host_header = f"[{host}]"
        else:
            host_header = host
        if port != default_port:
            host_header += f":{port}"
        if scheme == "https":
            pool: urllib3.HTTPConnectionPool = deadline.HTTPSConnectionPool(
                host, port, maxsize=self._max_connections, block=False, retries=False,
                timeout=self._timeout, cert_reqs="CERT_REQUIRED", ca_certs=self._ca_bundle,
            )
        else:
            pool = deadline.HTTPConnectionPool(
                host, port, maxsize=self._max_connections, block=False, retries=False,
                timeout=self._timeout,
            )
        with self._lock:
            old, self._pool = self._pool, pool
            self._state = (pool, host_header, prefix, SigV4Signer(region))
            self.endpoint_url = f"{scheme}://{host_header}{base}"
            self.region = region
        if old is not None:
            old.close()

    # -- the request --------------------------------------------------------------------------
    def get(self, key: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """GET ``key`` with extra ``headers`` (lower-case names: ``range``, ``if-match``).

        Returns the response, body read (raw, never content-decoded), connection released.
        Raises urllib3's exceptions for transport failures, and
        :class:`~.deadline.DeadlineExceeded` when the whole exchange took longer than
        ``request_timeout``. A response saying the bucket lives
        in another region is followed once: the region (and on AWS the endpoint) is switched
        for this and every later request, as botocore's region redirector does.
        """
        response = self._send(key, headers)
        if response.status in (301, 307, 400) and self._endpoint_for_region is not None:
            region = response.headers.get("x-amz-bucket-region")
            if region and region != self.region:
                self._target(self._endpoint_for_region(region), region)
                response = self._send(key, headers)
        return response

    def _send(self, key: str, extra: dict[str, str]) -> urllib3.BaseHTTPResponse:
        pool, host_header, prefix, signer = self._state
        path = prefix + quote(key, safe="/~")
        headers = {"host": host_header, **extra}
        creds = self._credentials.get_frozen_credentials() if self._credentials else None
        if creds is not None and creds.access_key and creds.secret_key:
            signer.sign("GET", path, headers, creds.access_key, creds.secret_key, creds.token)
        headers["user-agent"] = _USER_AGENT  # not signed, as botocore does not sign it
        limit = deadline.Deadline(self._request_timeout, setting="DATAHOARD_S3_REQUEST_TIMEOUT")
        with limit:
            try:
                response = pool.urlopen(
                    "GET", path, headers=headers, retries=False, redirect=False,
                    preload_content=True, decode_content=False, assert_same_host=False,
                    timeout=self._timeout,
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if limit.expired:  # the watchdog cut the connection: say so, not "reset"
                    raise limit.error() from exc
                raise
        return response

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def parse_error(status: int, body: bytes) -> tuple[str, str]:
    """``(code, message)`` of an S3 XML error body; the HTTP status when there is none."""
    code = _ERROR_CODE.search(body)
    message = _ERROR_MESSAGE.search(body)
    code_text = html.unescape(code.group(1).decode("utf-8", "replace")).strip() if code else ""
    message_text = (html.unescape(message.group(1).decode("utf-8", "replace")).strip()
                    if message else "")
    return code_text or str(status), message_text or code_text or f"HTTP {status}"
