"""Background warming: prefetch every file of the view into the cache.

Runs a bounded pool of fetchers over the index, directory by directory. Each fetch yields to
application reads (see ``fetch_priority.Priority``) and may be capped in bandwidth. Warming stops at
the cache's capacity instead of evicting what it just fetched, and stops with a clear message
when the source refuses it (credentials, permissions) rather than failing file after file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from .counters import Counters
from .dataset import DatasetCache
from .index import Index
from .source import RemoteObject, SourceAuthError, SourceError, SourcePermissionDenied, SourceUnreachable

log = logging.getLogger(__name__)

#: Stop filling when the cache is this full: warming must not evict its own work.
_FULL_ENOUGH = 0.98
_FATAL = (SourceAuthError, SourcePermissionDenied, SourceUnreachable)


class Warmer:
    def __init__(self, index: Index, cache: DatasetCache, counters: Counters, parallelism: int,
                 on_done: Callable[[], None] | None = None) -> None:
        self.index = index
        self.cache = cache
        self.counters = counters
        self.parallelism = max(1, parallelism)
        self._stop = threading.Event()
        #: Bytes of files handed to fetchers and not finished: with the store's usage, what the
        #: cache will hold, so the capacity check cannot be outrun by fetches in flight.
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Called on the warming thread once warming ended (the direct tree waits for it).
        self._on_done = on_done

    def start(self) -> None:
        progress = self.counters.warm
        progress.state = "running"
        # Counted afresh: a mount warms again once a full cache disk has room (worker.py).
        progress.files_done = progress.bytes_done = progress.fetched = 0
        progress.finished, progress.message = None, None
        progress.files_total = self.index.files
        progress.bytes_total = self.index.total_bytes
        progress.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="warmer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self) -> None:
        progress = self.counters.warm
        try:
            state, message = self._warm_all()
        except Exception as exc:  # noqa: BLE001 - reported in stats, the mount keeps serving
            log.exception("warming failed")
            state, message = "failed", str(exc)
        with self.counters.lock:
            progress.state, progress.message = state, message
            progress.finished = time.monotonic()
        log.info("warming %s: %s", state, message or f"{progress.files_done} files")
        if self._on_done is not None:
            self._on_done()

    def _warm_all(self) -> tuple[str, str | None]:
        store = self.cache.store
        pending: set[Future] = set()
        with ThreadPoolExecutor(self.parallelism, thread_name_prefix="warm") as pool:
            for obj in self.index.walk_files():
                if self._stop.is_set():
                    return "stopped", None
                with self._in_flight_lock:
                    if store.used_bytes + self._in_flight + obj.size > store.capacity * _FULL_ENOUGH:
                        return "done", "stopped at the cache capacity; the rest is fetched on demand"
                    self._in_flight += obj.size
                while len(pending) >= self.parallelism * 2:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    if (fatal := self._check(done)) is not None:
                        return "failed", fatal
                pending.add(pool.submit(self._warm_file, obj))
            done, _ = wait(pending)
            if (fatal := self._check(done)) is not None:
                return "failed", fatal
        return "done", None

    def _check(self, done: set[Future]) -> str | None:
        for future in done:
            exc = future.exception()
            if isinstance(exc, _FATAL):
                self._stop.set()
                return str(exc)
        return None

    def _warm_file(self, obj: RemoteObject) -> None:
        fetched = 0
        try:
            for chunk in self.cache.chunks(obj):
                if self._stop.is_set():
                    return
                fetched += self.cache.fill(obj, chunk, background=True)
        except _FATAL:
            raise
        except (SourceError, OSError) as exc:
            message = f"warming {obj.key}: {exc}"
            log.warning(message)
            self.counters.add_error(message)
            return
        finally:
            with self._in_flight_lock:
                self._in_flight -= obj.size
            with self.counters.lock:
                self.counters.warm.fetched += fetched
        with self.counters.lock:
            self.counters.warm.files_done += 1
            self.counters.warm.bytes_done += obj.size
