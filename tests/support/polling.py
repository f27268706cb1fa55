"""The one bounded wait of the test tree: poll until something has happened.

Tests wait for *events* in other threads and processes (a mount appearing, a controller writing
status, a worker finishing warm-up), never to assert how fast they happen, so the deadlines are
generous: a passing test waits only as long as the event takes, and a failing one ends with the
last assertion's message or the last value seen instead of hanging.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: What a check may raise while the thing it waits for is not there yet: an assertion about
#: the state so far, or a kubectl that failed (an object not created yet, a server restarting).
RETRIED: tuple[type[BaseException], ...] = (AssertionError, subprocess.CalledProcessError)


def eventually(check: Callable[[], T | None], timeout: float = 60.0, what: str = "condition", *,
               interval: float = 0.1) -> T:
    """Call ``check`` every ``interval`` s until it returns something truthy, and return that.

    A check that raises one of :data:`RETRIED` is tried again; after ``timeout`` seconds the last
    such error is raised again (its message says what was wrong), or else an AssertionError naming
    ``what`` and the last value the check returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        error: BaseException | None = None
        try:
            value = check()
            if value:
                return value
        except RETRIED as exc:
            error, value = exc, None
        if time.monotonic() > deadline:
            if isinstance(error, AssertionError):
                raise error
            last = error.stderr if isinstance(error, subprocess.CalledProcessError) else value
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
