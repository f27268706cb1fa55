"""The one retry policy: attempt cap, total deadline, full-jitter backoff, and which errors it
retries. No sleeping and no timing: the clock and the sleep are the test's."""

from __future__ import annotations

import pytest
import urllib3

from datahoard.cache_worker.retry import RetryPolicy, retryable
from datahoard.cache_worker.s3_errors import classify_response as _classify_response
from datahoard.cache_worker.source import (
    ChecksumMismatch,
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)


class Clock:
    """A clock that moves only when the policy sleeps (plus ``per_attempt`` per attempt)."""

    def __init__(self, per_attempt: float = 0.0) -> None:
        self.now = 1000.0
        self.per_attempt = per_attempt
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(error: Exception, clock: Clock | None = None, succeed_on: int | None = None):
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        if clock is not None:
            clock.now += clock.per_attempt
        if succeed_on is not None and len(calls) == succeed_on:
            return "ok"
        raise error

    return attempt, calls


def run(policy: RetryPolicy, attempt, clock: Clock, rand=lambda: 1.0):
    return policy.call(attempt, "s3://b/k", sleep=clock.sleep, clock=clock, rand=rand)


def test_a_transient_failure_is_retried_until_it_succeeds():
    clock = Clock()
    attempt, calls = failing(SourceTransientError("503"), succeed_on=3)
    assert run(RetryPolicy(max_attempts=5), attempt, clock) == "ok"
    assert len(calls) == 3 and len(clock.slept) == 2


def test_attempts_are_capped_and_the_last_error_is_raised_as_it_was():
    clock = Clock()
    error = SourceTransientError("S3 error on s3://b/k: SlowDown: slow down")
    attempt, calls = failing(error)
    with pytest.raises(SourceTransientError) as info:
        run(RetryPolicy(max_attempts=4, deadline=None), attempt, clock)
    assert info.value is error
    assert len(calls) == 4 and len(clock.slept) == 3


@pytest.mark.parametrize("max_attempts", [0, 1])
def test_one_attempt_is_always_made_and_none_repeated(max_attempts):
    clock = Clock()
    attempt, calls = failing(SourceTransientError("503"))
    with pytest.raises(SourceTransientError):
        run(RetryPolicy(max_attempts=max_attempts), attempt, clock)
    assert len(calls) == 1 and clock.slept == []


def test_no_attempt_starts_after_the_total_deadline():
    # Each attempt takes 4 s (a store answering 503 slowly); backoff is at most 1 s here.
    clock = Clock(per_attempt=4.0)
    attempt, calls = failing(SourceUnreachable("refused"), clock)
    policy = RetryPolicy(max_attempts=100, base_delay=1.0, max_delay=1.0, deadline=10.0)
    with pytest.raises(SourceUnreachable):
        run(policy, attempt, clock)
    # 4 + 1 + 4 + 1 = 10 s by the start of a third attempt: it is not started.
    assert len(calls) == 2
    assert clock.now - 1000.0 < 10.0


def test_backoff_is_full_jitter_capped():
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0)
    assert [policy.backoff(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6, 9)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert policy.backoff(3, rand=lambda: 0.0) == 0.0  # full jitter: from zero up
    assert policy.backoff(3, rand=lambda: 0.5) == pytest.approx(0.2)
    clock = Clock()
    attempt, _ = failing(SourceTransientError("503"))
    with pytest.raises(SourceTransientError):
        run(RetryPolicy(max_attempts=4, deadline=None), attempt, clock, rand=lambda: 0.5)
    assert clock.slept == pytest.approx([0.05, 0.1, 0.2])


@pytest.mark.parametrize(
    "error",
    [SourceNotFound("gone"), SourcePermissionDenied("403"), SourceChanged("412"),
     SourceAuthError("bad key"), SourceError("400 InvalidArgument"), ValueError("a bug")],
)
def test_permanent_failures_are_raised_at_once(error):
    clock = Clock()
    attempt, calls = failing(error)
    with pytest.raises(type(error)):
        run(RetryPolicy(max_attempts=5), attempt, clock)
    assert len(calls) == 1 and clock.slept == []


# -- which S3 answers are worth another attempt -----------------------------------------------
@pytest.mark.parametrize(
    "status, code, retried",
    [
        (503, "SlowDown", True),
        (500, "InternalError", True),
        (502, "502", True),  # a proxy's HTML page: no S3 code, the status decides
        (504, "504", True),
        (429, "TooManyRequests", True),
        (400, "RequestTimeout", True),  # S3 sends this one as a 400
        (403, "AccessDenied", False),
        (403, "SignatureDoesNotMatch", False),
        (404, "NoSuchKey", False),
        (404, "NoSuchBucket", False),
        (412, "PreconditionFailed", False),
        (400, "InvalidArgument", False),
        (416, "InvalidRange", False),
    ],
)
def test_which_s3_answers_are_retried(status, code, retried):
    error = _classify_response(status, code, "message", "s3://b/k", "http://s3")
    assert retryable(error) is retried
    assert "s3://b/k" in str(error)


def test_a_checksum_failure_in_transit_is_retried():
    assert retryable(ChecksumMismatch("checksum mismatch reading s3://b/k: MD5 ..."))


@pytest.mark.parametrize(
    "exc",
    [urllib3.exceptions.ProtocolError("Connection reset by peer"),
     urllib3.exceptions.ReadTimeoutError(None, "/b/k", "read timed out"),
     ConnectionResetError(104, "Connection reset by peer")],
    ids=["reset", "read-timeout", "os-reset"],
)
def test_a_broken_connection_is_retried(exc):
    from datahoard.cache_worker.s3_errors import transport_error as _transport_error

    error = _transport_error(exc, "s3://b/k", "http://s3")
    assert retryable(error) and "s3://b/k" in str(error)


def test_an_unreachable_endpoint_is_retried():
    from datahoard.cache_worker.s3_errors import transport_error as _transport_error

    exc = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    error = _transport_error(exc, "s3://b/k", "http://s3")
    assert isinstance(error, SourceUnreachable) and retryable(error)
