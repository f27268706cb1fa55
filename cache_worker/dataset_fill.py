"""Fills of the chunk cache: one fetch per missing chunk however many readers ask (single
flight), checked by the verifier before it is stored, and bounded in time for readers on
libfuse threads. A part of :class:`.dataset.DatasetCache`, which sets up the state in
``__init__``.

A read through the FUSE view must never hold a libfuse thread for long (metadata and cache hits
are answered by the same threads), so its fetches run on daemon fetcher threads and it waits for
them at most ``Tuning.read_wait`` seconds (:class:`SourceTimeout`). At most
``max_waiting_reads`` reads wait on the source at once (the view keeps libfuse threads in
reserve beyond them); more fail at once (:class:`SourceBusy`). A fetch its waiter gave up on is
*abandoned*: it runs to its own deadline in the background, but later readers of that chunk
start a fresh fetch instead of joining it, so a store that recovers serves them at once; while
``max_abandoned_fetches`` such fetches still run, new misses fail fast instead of piling up
threads on a stuck store.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from .source import Fetched, RemoteObject, SourceError
from .store import CacheFull, ChunkId


class SourceTimeout(SourceError):
    """A read waited ``read_wait`` seconds for the source without an answer."""


class SourceBusy(SourceError):
    """Too many reads already wait on the source, or too many fetches are stuck on it."""


class _Flight:
    """One fetch of one chunk, shared by every reader that asks for it while it runs."""

    __slots__ = ("future", "started", "abandoned")

    def __init__(self) -> None:
        self.future: Future[bytes | None] = Future()
        self.started = time.monotonic()
        self.abandoned = False


class DatasetFills:
    """Fills, single flight, abandoned fetches, fetching and storing.
    A part of :class:`.dataset.DatasetCache`, which sets up the state in ``__init__``."""

    def fill(self, obj: RemoteObject, chunk: ChunkId, background: bool = True) -> int:
        """Make sure ``chunk`` is cached (used by warming); returns bytes fetched."""
        if self.store.contains(chunk):
            return 0
        csize = self.chunk_size(obj)
        data = self._fill(obj, chunk, csize, demand=not background)
        others = self.verifier.take_assembled(chunk.object_id) - {chunk.index}
        return (len(data) if data is not None else 0) + sum(
            min(csize, obj.size - i * csize) for i in others)

    def _fill_waiting(self, obj: RemoteObject, chunk: ChunkId, csize: int, until: float) -> bytes | None:
        """``_fill`` for a reader on a libfuse thread: bounded in time and in number."""
        if not self._waiting.acquire(blocking=False):
            raise SourceBusy(
                f"not fetching {obj.key}: {self.tuning.max_waiting_reads} reads already wait on "
                f"the source (DATAHOARD_MAX_WAITING_READS)")
        try:
            return self._fill(obj, chunk, csize, demand=True, until=until)
        finally:
            self._waiting.release()

    def _fill(self, obj: RemoteObject, chunk: ChunkId, csize: int, demand: bool,
              until: float | None = None) -> bytes | None:
        """Fetch, verify and store one chunk, once however many threads ask at the same time.

        Returns the chunk's bytes, or None when it turned out to be cached already. Without
        ``until`` the fetch runs on the calling thread (warming, read-ahead), or the caller
        waits for the one in flight, however long its deadlines let it run. With ``until``
        (a monotonic time) it runs on a fetcher thread and the caller waits until then at most:
        past that it raises SourceTimeout and the fetch is abandoned (see the module's doc).
        """
        with self._lock:
            flight = self._inflight.get(chunk.name)
            if flight is not None and until is not None and not flight.abandoned and (
                time.monotonic() - flight.started > self.tuning.read_wait
            ):  # older than any reader may wait: it has outlived every reader it had
                self._abandon_locked(flight)
            owner = flight is None or flight.abandoned
            if owner:
                if until is not None and self._abandoned >= self.tuning.max_abandoned_fetches:
                    raise SourceBusy(
                        f"not fetching {obj.key}: {self._abandoned} fetches from the source have "
                        f"been stuck for over {self.tuning.read_wait:g} s")
                flight = self._inflight[chunk.name] = _Flight()
        if owner:
            if until is None:
                self._run_flight(flight, obj, chunk, csize, demand)
            else:
                self._fetchers.submit(self._run_flight, flight, obj, chunk, csize, demand)
        if until is None:
            return flight.future.result()
        try:
            return flight.future.result(timeout=max(0.0, until - time.monotonic()))
        except FutureTimeout:
            with self._lock:
                self._abandon_locked(flight)
            raise SourceTimeout(
                f"no answer from the source for {obj.key} (chunk {chunk.index}) in "
                f"{self.tuning.read_wait:g} s (DATAHOARD_READ_WAIT); its fetch goes on in the "
                f"background and the next read of it starts afresh") from None

    def _abandon_locked(self, flight: _Flight) -> None:
        if not flight.abandoned and not flight.future.done():
            flight.abandoned = True
            self._abandoned += 1

    def _run_flight(self, flight: _Flight, obj: RemoteObject, chunk: ChunkId, csize: int,
                    demand: bool) -> None:
        """The fetch of one flight; its outcome goes to the flight's waiters."""
        try:
            data = None
            if not self.store.contains(chunk):
                data = self.verifier.fetch_and_store(obj, chunk, csize, demand)
            flight.future.set_result(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters
            flight.future.set_exception(exc)
        finally:
            with self._lock:
                if self._inflight.get(chunk.name) is flight:  # not replaced by a fresh fetch
                    del self._inflight[chunk.name]
                if flight.abandoned:
                    self._abandoned -= 1

    def _fetch(self, obj: RemoteObject, start: int, length: int, demand: bool) -> Fetched:
        if demand:
            with self.priority.demand():
                got = self.source.fetch(obj, start, length)
        else:
            if self.warm_limiter:
                self.warm_limiter.consume(length)
            with self.priority.background():
                got = self.source.fetch(obj, start, length)
        self.counters.add_fetched(len(got.data))
        return got

    def _put(self, chunk: ChunkId, data: bytes) -> None:
        """Store verified bytes; a full cache degrades to reading through."""
        try:
            self.store.put(chunk, data)
            if self.counters.degraded:
                self.counters.set_degraded(None)
        except CacheFull as exc:
            self.counters.set_degraded(f"reading through without caching: {exc}")
