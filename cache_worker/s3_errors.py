"""S3 failures as source errors: every botocore exception, lean-path answer or broken transfer
is classified here, once, into the kinds the worker and :mod:`.retry`'s policy act on, with a
message a person can act on (it ends up in the Dataset's WorkersReady condition).

Retried (transient) only when another attempt can get another answer: throttling, 5xx,
connection errors, timeouts and bodies that break off; not some other 4xx.
"""

from __future__ import annotations

import botocore.exceptions

from . import s3_get
from .source import (
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)

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
#: A body that broke off on botocore's path: the transfer is retried.
BODY_ERRORS = (
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
)


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


def classify_response(status: int, code: str, message: str, what: str, endpoint: str) -> SourceError:
    """An S3 error answer as one SourceError; transient (retried) only when another attempt
    can get another answer: 429, 5xx or a throttling/5xx code, not some other 4xx."""
    error = _classify_code(code, message, what, endpoint)
    if type(error) is SourceTransientError and not (
        status in _RETRY_STATUSES or code in _RETRY_CODES
    ):
        return SourceError(str(error))
    return error


def transport_error(exc: BaseException, what: str, endpoint: str) -> SourceError:
    """A lean GET that got no answer: unreachable before anything was sent, else the transfer
    broke (reset, timeout, short body); both retried."""
    if isinstance(exc, s3_get.CONNECT_ERRORS):
        return SourceUnreachable(f"cannot reach S3 endpoint {endpoint} for {what}: {_reason(exc)}")
    return SourceTransientError(f"S3 transfer of {what} failed: {_reason(exc)}")


def classify(exc: Exception, what: str, endpoint: str) -> SourceError:
    """Turn a botocore failure into one SourceError with a message a person can act on."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return SourceAuthError(f"no S3 credentials found for {what}")
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return classify_response(status, code, err.get("Message") or code, what, endpoint)
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


def _reason(exc: BaseException) -> str:
    """urllib3 nests the useful part (refused, timed out, reset) in ``reason``."""
    reason = getattr(exc, "reason", None)
    return f"{exc.__class__.__name__}: {reason or exc}"
