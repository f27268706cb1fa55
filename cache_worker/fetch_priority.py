"""How warming gives way: application reads first (:class:`Priority`), and an optional cap on
warming's bandwidth (:class:`RateLimiter`). The cache's fetches go through both (``dataset_fill.py``);
apart from the read path because they are about sharing the source, not about chunks.
"""

from __future__ import annotations

import threading
import time


class Priority:
    """Application reads first: while any are waiting on the source, warming runs narrower.

    Warming threads call :meth:`background` before each fetch; it blocks while application
    fetches are in flight and a quarter of the warming parallelism is already busy, so readers
    get most of the connections and bandwidth without warming stopping outright.
    """

    def __init__(self, parallelism: int) -> None:
        self._cond = threading.Condition()
        self._demand = 0
        self._background = 0
        self._narrow = max(1, parallelism // 4)

    def demand(self) -> "_Slot":
        return _Slot(self, demand=True)

    def background(self) -> "_Slot":
        return _Slot(self, demand=False)

    def _enter(self, demand: bool) -> None:
        with self._cond:
            if demand:
                self._demand += 1
                return
            while self._demand and self._background >= self._narrow:
                self._cond.wait(0.5)
            self._background += 1

    def _exit(self, demand: bool) -> None:
        with self._cond:
            if demand:
                self._demand -= 1
            else:
                self._background -= 1
            self._cond.notify_all()


class _Slot:
    def __init__(self, owner: Priority, demand: bool) -> None:
        self._owner, self._demand = owner, demand

    def __enter__(self) -> None:
        self._owner._enter(self._demand)

    def __exit__(self, *exc: object) -> None:
        self._owner._exit(self._demand)


class RateLimiter:
    """Token bucket over bytes; one second of burst."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)
