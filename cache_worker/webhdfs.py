"""A WebHDFS client: the NameNode's REST API, so no JVM and no native client in the worker.

This module makes one attempt of one WebHDFS call and says what went wrong; what the URI names
is :mod:`.hdfs_uri`'s, and what the calls mean for a dataset (walking, version checks, retries)
is :mod:`.hdfs`'s job.

Failures are classified once, in :func:`_classify`, from the ``RemoteException`` JSON body the
NameNode and DataNodes send. One attempt goes once around the NameNode list, a refused
connection or a ``StandbyException`` moving to the next NameNode at once (failover, not a
retry). Each attempt has a total deadline (``request_timeout``: connect, headers and the whole
body, the DataNode's bytes included, see :mod:`.deadline`), so a NameNode or DataNode that drips
its answer is cut off like a silent one. urllib3 retries nothing: every retry decision is the
caller's.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
from urllib.parse import quote, urlsplit

import urllib3

from . import deadline
from .hdfs_uri import DEFAULT_HTTP_PORT, HdfsOptions, parse_hdfs_uri
from .source import (
    SourceAuthError,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)

_NOT_FOUND = {"FileNotFoundException"}
_DENIED = {"AccessControlException"}
_AUTH = {"InvalidToken", "AuthenticationException", "SecurityException", "AuthorizationException"}
#: The NameNode is there but cannot serve this now: another NameNode, or a later try, may.
_FAILOVER = {"StandbyException", "ObserverRetryOnActiveException"}
_RETRIABLE = {"RetriableException", "SafeModeException", "IOException", "ConnectException",
              "SocketTimeoutException", "EOFException"}
_CONNECT_ERRORS = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.NameResolutionError,
)


def _remote_exception(body: bytes) -> tuple[str, str]:
    """(exception class, message) of a WebHDFS error body; ("", text) if it is not JSON."""
    try:
        remote = json.loads(body)["RemoteException"]
        return str(remote.get("exception", "")), str(remote.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return "", text[:300]


class _Failover(SourceError):
    """This NameNode cannot serve the call (unreachable or standby): try the next one."""


def _classify(status: int, body: bytes, what: str, endpoint: str) -> SourceError:
    """One SourceError, with a message a person can act on, for a failed WebHDFS response."""
    exception, message = _remote_exception(body)
    message = message or f"HTTP {status}"
    if exception in _FAILOVER:
        return _Failover(f"NameNode {endpoint} is not active: {message}")
    if exception in _NOT_FOUND:
        return SourceNotFound(f"not found: {what}")
    if exception in _DENIED:
        return SourcePermissionDenied(f"permission denied on {what}: {message}")
    if exception in _AUTH or status == 401:
        return SourceAuthError(
            f"HDFS rejected the credentials for {what} (endpoint {endpoint}): {message}; "
            f"a Kerberos cluster needs DATAHOARD_HDFS_DELEGATION_TOKEN, and tokens expire"
        )
    if "Hadoop IPC port" in message:
        return SourceError(
            f"{endpoint} is a Hadoop RPC port, not WebHDFS (reading {what}): use the NameNode's "
            f"HTTP port (dfs.namenode.http-address, default {DEFAULT_HTTP_PORT}), e.g. "
            f"hdfs://namenode:{DEFAULT_HTTP_PORT}/path")
    if status == 404:
        return SourceError(f"{endpoint} serves no WebHDFS at /webhdfs/v1 (dfs.webhdfs.enabled "
                           f"false, or not the NameNode's HTTP port?) reading {what}: {message}")
    if exception in _RETRIABLE or status >= 500 or status == 429:
        return SourceTransientError(f"HDFS error on {what}: {exception or status}: {message}")
    if status == 403:
        return SourcePermissionDenied(f"permission denied on {what}: {exception}: {message}")
    return SourceError(f"HDFS refused the request for {what}: {exception or status}: {message}")


class WebHdfs:
    """One attempt of one WebHDFS call against the NameNodes of one HDFS URI."""

    def __init__(self, uri: str, options: HdfsOptions) -> None:
        self.options = options
        self.target = parse_hdfs_uri(uri, options.namenodes)
        self.endpoint = ",".join(self.target.namenodes)
        self._uri_scheme = uri.partition("://")[0]
        self.user = options.user or getpass.getuser()
        self._active = 0  # index into target.namenodes of the last NameNode that answered
        self._http = urllib3.PoolManager(
            # One pool per NameNode and per DataNode read from: enough that a large cluster's
            # DataNodes do not evict each other's kept-alive connections.
            num_pools=256,
            maxsize=options.max_connections,
            block=False,
            retries=False,  # every retry decision is ours (failover, backoff, classification)
            timeout=urllib3.Timeout(connect=options.connect_timeout, read=options.read_timeout),
        )
        self._http.pool_classes_by_scheme = deadline.POOL_CLASSES  # cut by the deadline watchdog
        self._auth = (
            {"delegation": options.delegation_token} if options.delegation_token
            else {"user.name": self.user}
        )
        if options.delegation_token:
            _redact_tokens_in_urllib3_logs()

    # -- naming -------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        base = self.target.path.rstrip("/")
        return f"{base}/{key}" if key else (base or "/")

    def where(self, key: str = "") -> str:
        """The printable URI of ``key``, as the user wrote the dataset's."""
        return f"{self._uri_scheme}://{self.target.authority}{self.path(key)}"

    # -- the one place requests are made ------------------------------------------------------
    def deadline(self) -> deadline.Deadline:
        """The scope of one WebHDFS operation; each NameNode attempt restarts its clock."""
        return deadline.Deadline(self.options.request_timeout, setting="DATAHOARD_HDFS_REQUEST_TIMEOUT")

    def timed_out(self, doing: str) -> SourceTransientError:
        return SourceTransientError(
            f"{doing} timed out: no complete answer in {self.options.request_timeout:g} s "
            f"(DATAHOARD_HDFS_REQUEST_TIMEOUT)")

    def namenode_call(self, op: str, key: str, params: dict[str, str] | None = None,
                      *, method: str = "GET") -> urllib3.BaseHTTPResponse:
        """One attempt of one WebHDFS call: once around the NameNode list, from the one that
        answered last, until one that is up and active answers. No retries here: the
        operation calling this is retried as a whole by the caller's policy.

        Returns the response (status 200 or a redirect) with its body unread, so a 200 OPEN
        from HttpFS can be streamed; raises a classified SourceError otherwise.
        """
        what = self.where(key)
        query = {"op": op, **self._auth, **(params or {})}
        path = "/webhdfs/v1" + quote(self.path(key), safe="/")
        namenodes = self.target.namenodes
        error: SourceError | None = None
        for step in range(len(namenodes)):
            index = (self._active + step) % len(namenodes)
            endpoint = f"{self.target.scheme}://{namenodes[index]}"
            limit = deadline.current()
            if limit is not None:
                limit.rearm()  # every NameNode gets the whole time
            try:
                response = self._http.request(method, endpoint + path, fields=query,
                                              redirect=False, preload_content=False)
            except _CONNECT_ERRORS as exc:
                error = SourceUnreachable(
                    f"cannot reach NameNode {endpoint} for {what}: {_reason(exc)}")
                continue
            except urllib3.exceptions.HTTPError as exc:
                if limit is not None and limit.expired:
                    raise self.timed_out(f"HDFS {op} of {what} at {endpoint}") from exc
                raise SourceTransientError(
                    f"HDFS call for {what} to {endpoint} failed: {_reason(exc)}") from exc
            if response.status in (200, 307) or 300 <= response.status < 400:
                self._active = index
                return response
            body = response.read()
            response.release_conn()
            error = _classify(response.status, body, what, endpoint)
            if isinstance(error, _Failover):
                continue
            self._active = index
            raise error
        assert error is not None
        if isinstance(error, _Failover):
            raise SourceUnreachable(f"no active NameNode among {self.endpoint} for {what}: {error}")
        if len(namenodes) > 1:
            raise SourceUnreachable(f"cannot reach any NameNode of {self.endpoint}: {error}")
        raise error

    def json(self, op: str, key: str, params: dict[str, str] | None = None) -> dict:
        """One attempt of a NameNode JSON operation, under its own deadline."""
        limit = self.deadline()
        with limit:
            response = self.namenode_call(op, key, params)
            try:
                body = response.read()
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if limit.expired:
                    raise self.timed_out(f"HDFS {op} of {self.where(key)}") from exc
                raise SourceTransientError(f"HDFS {op} of {self.where(key)} failed: {exc}") from exc
            finally:
                response.release_conn()
            if limit.expired:  # cut at the very end: the body may be short
                raise self.timed_out(f"HDFS {op} of {self.where(key)}")
        if response.status != 200:
            raise SourceError(f"unexpected HTTP {response.status} for {op} on {self.where(key)}")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise SourceTransientError(
                f"HDFS {op} of {self.where(key)} returned something other than JSON") from exc

    def redirected(self, op: str, key: str, where: str, params: dict | None = None) -> bytes:
        """The body of ``op``, which the NameNode may hand to a DataNode with a 307 (HttpFS: 200)."""
        response = self.namenode_call(op, key, params)
        if response.status != 200:
            location = response.headers.get("Location")
            response.drain_conn()
            response.release_conn()
            if not location:
                raise SourceError(f"NameNode answered {op} of {where} with HTTP "
                                  f"{response.status} and no Location")
            datanode = urlsplit(location).netloc
            try:
                response = self._http.request("GET", location, redirect=False,
                                              preload_content=False)
            except urllib3.exceptions.HTTPError as exc:
                raise SourceTransientError(
                    f"{op} of {where} from DataNode {datanode} failed: {_reason(exc)} (the NameNode "
                    f"sends clients to the DataNodes' registered addresses, which must be "
                    f"reachable from here)") from exc
            if response.status != 200:
                body = response.read()
                response.release_conn()
                raise _classify(response.status, body, where, f"DataNode {datanode}")
        try:
            return response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SourceTransientError(f"HDFS {op} of {where} failed: {_reason(exc)}") from exc
        finally:
            response.release_conn()

    def redirected_json(self, op: str, key: str, where: str) -> dict:
        """A JSON answer that the NameNode may hand to a DataNode (see :meth:`redirected`)."""
        body = self.redirected(op, key, where)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise SourceTransientError(f"HDFS {op} of {where} returned something other than JSON") from exc

    def close(self) -> None:
        self._http.clear()


class _RedactTokens(logging.Filter):
    """urllib3 logs every request's URL at DEBUG (``-vv``); WebHDFS carries the token in it."""

    _TOKEN = re.compile(r"(delegation=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "delegation=" in message:
            record.msg, record.args = self._TOKEN.sub(r"\1<redacted>", message), ()
        return True


def _redact_tokens_in_urllib3_logs() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactTokens) for f in logger.filters):
        logger.addFilter(_RedactTokens())


def _reason(exc: Exception) -> str:
    """urllib3 wraps the interesting part (refused, DNS, timeout) a level or two down."""
    reason = getattr(exc, "reason", None) or exc
    return str(reason)
