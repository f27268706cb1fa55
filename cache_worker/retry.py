"""The one retry policy for requests to a source: S3 (lean and botocore paths) and WebHDFS.

Every request to a store is retried by exactly one loop, this one, so the attempt count a person
sets is the number of requests the store sees (botocore's own retries are off, ``s3_client.py``; the
HDFS client makes one pass over its NameNodes per attempt, ``webhdfs.py``). Before this module there
were three loops with three backoffs, nested on HDFS so that ``max_attempts=5`` could mean 25
requests, and botocore's retries ran inside ours.

- **Which errors**: :func:`retryable`: the store said "later" (5xx, 429, SlowDown and the other
  throttling codes, classified as :class:`SourceTransientError` by each source), the connection
  broke (reset, short body, timeout, a checksum that failed in transit) or the endpoint could
  not be reached (:class:`SourceUnreachable`). Everything else (403, 404, 412, bad credentials,
  other 4xx) gets the same answer the next time and is raised at once.
- **Backoff**: "full jitter" (AWS Architecture Blog, *Exponential Backoff And Jitter*): before
  attempt n+1 sleep ``uniform(0, min(max_delay, base_delay * 2**(n-1)))``. Of the schemes
  compared there it spreads a crowd of clients the most for the least total wait, which is
  the case here: one worker per node, all throttled by the same bucket at once.
- **Bounds**: at most ``max_attempts`` attempts, and no attempt starts once ``deadline``
  seconds have passed since the first one (a backoff that would end past it is not slept).
  An attempt in flight is bounded by its own request timeout (:mod:`.deadline`), so a call
  takes at most ``deadline`` plus one request timeout.

Written here rather than taken from tenacity or stamina: the whole policy is twenty lines, it
runs once per chunk fetch on the hot path, and the sources need the clock and the sleep
injectable for tests without timing. Measured with ``python -m timeit`` on the 2-core test
machine under load, per call that succeeds at once: this policy 0.4-0.7 us; tenacity 9.2's
``Retrying`` with the same stop/wait/retry 15.8 us (its per-call state objects), against
about 600 us of client CPU per lean GET (``bench/lean_get.py``). Neither cost matters; the
dependency would buy nothing these twenty lines do not do.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .source import SourceTransientError, SourceUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed where this one failed (see the module docstring)."""
    return isinstance(exc, SourceTransientError | SourceUnreachable)


@dataclass(frozen=True)
class RetryPolicy:
    #: Attempts in all, the first included; at least one is always made.
    max_attempts: int = 5
    #: Backoff ceiling before the second attempt; doubles per attempt up to ``max_delay``.
    base_delay: float = 0.1
    max_delay: float = 2.0
    #: Seconds after the first attempt began past which no new attempt starts; None: only
    #: ``max_attempts`` bounds the retries.
    deadline: float | None = 300.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based): full jitter."""
        return rand() * min(self.max_delay, self.base_delay * 2 ** (attempt - 1))

    def call(
        self,
        attempt: Callable[[], T],
        what: str,
        *,
        is_retryable: Callable[[BaseException], bool] = retryable,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> T:
        """``attempt()`` until it returns, fails for good, or the attempts or time run out;
        then the last error is raised as it was (its message names the object: ``what`` is
        only for the log)."""
        started = clock()
        attempts = max(1, self.max_attempts)
        number = 1
        while True:
            try:
                return attempt()
            except Exception as exc:
                if number >= attempts or not is_retryable(exc):
                    raise
                delay = self.backoff(number, rand)
                if self.deadline is not None and clock() - started + delay >= self.deadline:
                    log.info("giving up on %s after %d attempts in %.1f s: %s", what, number,
                             clock() - started, exc)
                    raise
                log.info("retrying %s after %s (attempt %d/%d)", what, exc, number, attempts)
            sleep(delay)
            number += 1
