"""Daemon fetcher threads for reads that must not wait on a libfuse thread (see ``dataset.py``).
Its own module: a small thread pool with rules of its own (below), used twice by the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("datahoard.cache_worker.dataset")  # one log for the read path, as before the split


class Fetchers:
    """Daemon threads that run submitted calls: a new thread whenever none is idle (up to
    ``limit``, beyond which calls queue), idle ones exit after a minute.

    Daemon, unlike ``ThreadPoolExecutor``'s: a fetch stuck on a silent store must not keep the
    worker process alive after its mount is gone. Every call submitted while a thread is idle
    claims that thread, so a call never queues behind a stuck one unless ``limit`` is reached.
    """

    def __init__(self, name: str, limit: int | None = None) -> None:
        self._name = name
        self._limit = limit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = self._threads = 0
        self._closed = False

    def submit(self, fn: Callable, *args) -> None:
        with self._lock:
            if self._closed:
                return
            if self._idle:
                self._idle -= 1  # claimed: it takes this call (or one queued just before)
            elif self._limit is None or self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._run, name=f"{self._name}-{self._threads}",
                                 daemon=True).start()
            self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=60)
            except queue.Empty:
                with self._lock:
                    if self._idle and self._queue.empty():
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a call reports its own failures
                log.debug("%s call failed", self._name, exc_info=True)
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Stop taking calls; idle threads exit, busy ones when their call returns."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)

