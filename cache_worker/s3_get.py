"""A lean S3 GET: one urllib3 connection pool and botocore's SigV4 signer, no botocore pipeline.

Chunk fetches are the worker's hot path. Through botocore one ``get_object`` plus its body costs
3.5-4 ms of CPU (request pipeline, event hooks, ``uuid4``, user-agent building, checksum
plumbing), which caps a single worker process at about 260 fetches/s (bench/ANALYSIS.md). The
same request here is a URL, a handful of headers and a signature.

What is botocore's stays botocore's: where a GetObject of the bucket goes (endpoint rules:
virtual-host or path style, FIPS, dual-stack, custom endpoints) is resolved once by the
botocore client itself (:func:`resolve`, which runs the client's real pipeline up to signing
and stops there), and every request is signed by ``botocore.auth.S3SigV4Auth`` with the
signing name and region that resolution gave. Anything botocore would sign differently (SigV4a
for multi-region access points, S3 Express sessions) makes :func:`resolve` return None and the
GETs go through botocore.

Measured (``python -m bench.lean_get``: small ranged GETs from 8 threads, moto on the same
2-core machine under a load of 8-13 from other work, old and new runs interleaved): with the
hand-written signer this replaced, 275-399 requests/s at 522-659 us of client CPU per request;
with botocore's signer 305-399 requests/s at 604-687 us. Signing alone costs 150-195 us per
request with ``S3SigV4Auth`` against 19-27 us by hand (``AWSRequest``'s ``email.message``
headers, built again inside the signer, are most of it), so about +15 % of the lean path's CPU
per request and no change in requests/s that the noise lets us see; still a twentieth of the
3.5 ms the botocore pipeline costs. Kept: one signer fewer to maintain and prove.

This module only *transports*: it builds, signs and sends one GET and returns the response with
its body read, all of it (connect, headers, body) within ``request_timeout`` seconds
(:mod:`.deadline`: a store that drips its body a byte at a time is cut off, not waited for).
Deciding what a status means, retrying and verifying the bytes is
:class:`cache_worker.s3.S3Source`'s job. Listing and HEAD stay on botocore.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import botocore
import botocore.config
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from . import deadline

_USER_AGENT = "datahoard"
_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
#: The key :func:`resolve` asks botocore to address; never sent.
_PROBE_KEY = "datahoard-probe"
#: Signature versions that mean plain SigV4 header signing for S3.
_SIGV4 = {"s3v4", "v4"}
#: GETs carry no body: sign ``UNSIGNED-PAYLOAD``, as botocore's S3 client does over HTTPS.
_SIGNING_CONTEXT = {"client_config": botocore.config.Config(s3={"payload_signing_enabled": False})}

#: Errors raised before anything reached the server: the endpoint is unreachable.
CONNECT_ERRORS = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.NameResolutionError,
)


@dataclass(frozen=True)
class Target:
    """Where botocore sends a GetObject of one bucket, and how it signs it."""

    #: URL of the key ``""``: the URI-encoded key is appended (path or virtual-host style).
    url_prefix: str
    #: Signing region and name; ``signed`` False: anonymous, requests go unsigned.
    region: str
    signing_name: str = "s3"
    signed: bool = True


class _Resolved(Exception):
    def __init__(self, target: Target | None) -> None:
        self.target = target


def resolve(client, bucket: str) -> Target | None:
    """The :class:`Target` the botocore ``client`` resolves for ``bucket``, or None when it
    would sign GETs with something other than plain SigV4.

    Runs a real ``get_object`` through the client's pipeline (parameter validation, endpoint
    rules, signer choice) and stops it at ``before-sign``, before credentials are used or
    anything is sent: what botocore would have done is then known without our copy of it.
    """
    def stop(request, signing_name, region_name, signature_version, **_) -> None:
        signing = request.context.get("signing", {})
        url = request.url
        if not url.endswith("/" + _PROBE_KEY) or "?" in url:
            raise _Resolved(None)
        prefix = url[: -len(_PROBE_KEY)]
        if signature_version is botocore.UNSIGNED:
            raise _Resolved(Target(prefix, signing.get("region") or region_name, signed=False))
        if (signature_version not in _SIGV4 or signing.get("request_credentials")
                or signing.get("identity_cache") is not None):
            raise _Resolved(None)  # SigV4a, S3 Express: botocore's to sign
        raise _Resolved(Target(prefix, signing.get("region") or region_name,
                               signing.get("signing_name") or signing_name))

    event = "before-sign.s3.GetObject"
    client.meta.events.register_first(event, stop, unique_id="datahoard-resolve")
    try:
        client.get_object(Bucket=bucket, Key=_PROBE_KEY)
    except _Resolved as resolved:
        return resolved.target
    finally:
        client.meta.events.unregister(event, unique_id="datahoard-resolve")
    raise AssertionError("botocore sent a request it should have stopped before signing")


class ObjectGetter:
    """Signed GETs of one bucket's objects through one shared, thread-safe connection pool,
    to the URL botocore resolved (:func:`resolve`), signed by botocore's SigV4 signer."""

    def __init__(
        self,
        *,
        target: Target,
        credentials: object | None,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        request_timeout: float = 60.0,
        ca_bundle: str | None = None,
        target_for_region: Callable[[str], Target | None] | None = None,
    ) -> None:
        self._credentials = credentials  # botocore Credentials (maybe refreshable) or None
        self._max_connections = max(1, max_connections)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._request_timeout = request_timeout
        self._ca_bundle = ca_bundle
        self._target_for_region = target_for_region
        self._lock = threading.Lock()
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._use(target)

    # -- addressing ---------------------------------------------------------------------------
    def _use(self, target: Target) -> None:
        parts = urlsplit(target.url_prefix)
        scheme = parts.scheme or "https"
        host = parts.hostname or ""
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        host_header = f"[{host}]" if ":" in host else host  # IPv6 literal
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
            self._state = (pool, f"{scheme}://{host_header}", host_header, parts.path or "/", target)
            self.target = target
        if old is not None:
            old.close()

    @property
    def region(self) -> str:
        return self.target.region

    # -- the request --------------------------------------------------------------------------
    def get(self, key: str, headers: dict[str, str], version: str = "") -> urllib3.BaseHTTPResponse:
        """GET ``key`` (its ``version``, a versionId, if given) with extra ``headers``
        (lower-case names: ``range``, ``if-match``).

        Returns the response, body read (raw, never content-decoded), connection released.
        Raises urllib3's exceptions for transport failures, and
        :class:`~.deadline.DeadlineExceeded` when the whole exchange took longer than
        ``request_timeout``. A response saying the bucket lives in another region is followed
        once: the target is resolved again for that region and used for this and every later
        request, as botocore's region redirector does.
        """
        response = self._send(key, headers, version)
        if response.status in (301, 307, 400) and self._target_for_region is not None:
            region = response.headers.get("x-amz-bucket-region")
            if region and region != self.target.region:
                target = self._target_for_region(region)
                if target is not None:
                    self._use(target)
                    response = self._send(key, headers, version)
        return response

    def _send(self, key: str, extra: dict[str, str], version: str = "") -> urllib3.BaseHTTPResponse:
        pool, base, host_header, prefix, target = self._state
        path = prefix + quote(key, safe="/~")
        if version:
            path += "?versionId=" + quote(version, safe="~")
        headers = {"host": host_header, **extra}
        creds = self._credentials.get_frozen_credentials() if self._credentials else None
        if target.signed and creds is not None and creds.access_key and creds.secret_key:
            request = AWSRequest(method="GET", url=base + path, headers=headers)
            request.context.update(_SIGNING_CONTEXT)
            S3SigV4Auth(creds, target.signing_name, target.region).add_auth(request)
            headers = dict(request.headers.items())
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
