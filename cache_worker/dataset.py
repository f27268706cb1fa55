"""Reads of dataset files through the chunk cache: the worker's hot path.

A read is split at chunk boundaries; each piece is served from the store (a *hit*) or fetched
from the source, checked against what the store vouches for (verify.py: a large object is
checked whole before any of it is served), stored and served (a *miss*). Concurrent readers of one missing chunk share
one fetch (single flight). Sequential readers of a large file trigger read-ahead of the next
chunks. Warming goes through the same fill path but yields to application reads through
:class:`Priority`.

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

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from .counters import Counters
from .source import Fetched, RemoteObject, Source, SourceError
from .store import CacheFull, ChunkId, ChunkStore, chunk_of, object_id
from .verify import Verifier

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class Tuning:
    #: Objects up to this size are fetched and stored whole: one request, one file, and the
    #: unit the kernel page cache accounting (see fs.py) relies on.
    whole_file_max: int = 8 * MiB
    #: Larger objects are fetched in chunks of this size: big enough for S3 throughput, small
    #: enough that a random 4 KiB read costs one modest request.
    chunk_size: int = 8 * MiB
    #: Chunks fetched ahead of a sequential reader of a large file.
    readahead_chunks: int = 4
    #: Parallel fetches while warming.
    warm_parallelism: int = 16
    #: Bytes/s cap on warming traffic; None for no cap. Application reads are never capped.
    warm_bandwidth: float | None = None
    #: Large objects up to this size are fetched and checked whole before any byte of them is
    #: served (see verify.py); larger ones are served as their chunks arrive and checked once
    #: every chunk is cached. 1 GiB: shards are read whole anyway, and a random read into a
    #: bigger file must not fetch all of it.
    check_whole_max: int = 1 << 30
    #: Seconds a read through the view waits for the source before it fails (EIO): a store
    #: that went silent must not hold the reader, or a libfuse thread, for the many minutes
    #: its fetch's retries may last.
    read_wait: float = 120.0
    #: Reads that may wait on the source at once; the view runs this many libfuse threads plus
    #: a reserve that never waits on the source.
    max_waiting_reads: int = 64
    #: Fetches whose readers gave up that may still run before new misses fail fast.
    max_abandoned_fetches: int = 16


def read_limits_from_env(environ: Mapping[str, str]) -> dict:
    """``DATAHOARD_READ_WAIT`` (seconds, default 120) and ``DATAHOARD_MAX_WAITING_READS``
    (default 64), as :class:`Tuning` keyword arguments."""
    limits: dict = {}
    if environ.get("DATAHOARD_READ_WAIT"):
        limits["read_wait"] = float(environ["DATAHOARD_READ_WAIT"])
    if environ.get("DATAHOARD_MAX_WAITING_READS"):
        limits["max_waiting_reads"] = max(1, int(environ["DATAHOARD_MAX_WAITING_READS"]))
    return limits


class SourceTimeout(SourceError):
    """A read waited ``read_wait`` seconds for the source without an answer."""


class SourceBusy(SourceError):
    """Too many reads already wait on the source, or too many fetches are stuck on it."""


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


class _Flight:
    """One fetch of one chunk, shared by every reader that asks for it while it runs."""

    __slots__ = ("future", "started", "abandoned")

    def __init__(self) -> None:
        self.future: Future[bytes | None] = Future()
        self.started = time.monotonic()
        self.abandoned = False


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


@dataclass
class ReadState:
    """Per open file: where a sequential reader is, how far read-ahead has gone, and which
    chunks were fetched from the source on its behalf (so re-reads of them are not hits)."""

    obj: RemoteObject
    next_offset: int = 0
    readahead_until: int = 0
    sourced: set[int] = field(default_factory=set)


class DatasetCache:
    def __init__(self, source: Source, store: ChunkStore, counters: Counters, tuning: Tuning) -> None:
        self.source = source
        self.store = store
        self.counters = counters
        self.tuning = tuning
        self.priority = Priority(tuning.warm_parallelism)
        self.warm_limiter = RateLimiter(tuning.warm_bandwidth) if tuning.warm_bandwidth else None
        self._inflight: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._readahead = Fetchers("readahead", limit=4)
        self._fetchers = Fetchers("fetch")
        #: Fetches abandoned by their waiters that are still running.
        self._abandoned = 0
        self._waiting = threading.BoundedSemaphore(max(1, tuning.max_waiting_reads))
        self.verifier = Verifier(self)

    # -- layout ----------------------------------------------------------------------------
    def chunk_size(self, obj: RemoteObject) -> int:
        return max(obj.size, 1) if obj.size <= self.tuning.whole_file_max else self.tuning.chunk_size

    def chunks(self, obj: RemoteObject) -> list[ChunkId]:
        oid = object_id(obj.key, obj.etag, obj.size)
        size = self.chunk_size(obj)
        count = max(1, -(-obj.size // size))
        return [chunk_of(oid, obj.size, i, size) for i in range(count)]

    def is_cached(self, obj: RemoteObject) -> bool:
        return all(self.store.contains(c) for c in self.chunks(obj))

    def backing_fd(self, obj: RemoteObject) -> int | None:
        """A read-only descriptor of ``obj``'s cache file for the kernel to read directly (FUSE
        passthrough), or None: then the view serves reads itself.

        Only a file whole in the cache, every chunk verified against its CRC
        (``ChunkStore.backing_fd``), and vouched for by the source's checksum: objects up to
        ``check_whole_max`` are checked whole before any chunk of them is stored (verify.py);
        larger ones are served as they arrive and checked once complete, so they are passed
        through only once that check matched (recorded in ``chunks.db``); until then this
        queues the check and the view serves them.
        """
        if obj.size == 0:
            return None
        oid = object_id(obj.key, obj.etag, obj.size)
        fd = self.store.trusted_backing_fd(oid)  # vouched for (and rule-checked) in this process
        if fd is not None:
            return fd
        chunks = self.chunks(obj)
        if len(chunks) > 1 and obj.size > self.verifier.check_limit() and not self.store.source_checked(oid):
            if self.is_cached(obj):
                self.verifier.queue_check(obj, self.chunk_size(obj))
            return None
        return self.store.backing_fd(oid, chunks)

    # -- reads -----------------------------------------------------------------------------
    def read(self, state: ReadState, offset: int, size: int, prepaid: bool = False,
             bounded: bool = False, pid: int = 0) -> bytes:
        """Up to ``size`` bytes of ``state.obj`` at ``offset``, exactly as the source has them.

        ``prepaid``: the caller already counted these bytes as served from cache (an open of a
        file known to be cached, see fs.py); only bytes that needed the source are counted,
        moved from the cache column to the source column.

        ``bounded`` (reads on libfuse threads): fetch on a fetcher thread and wait for it at
        most ``read_wait`` seconds in all; raise SourceBusy instead of waiting when
        ``max_waiting_reads`` reads already wait on the source.

        ``pid``: the reading process (the FUSE request's), to whom the bytes are counted.
        The accounting rules are in counters.py's docstring.
        """
        obj = state.obj
        end = min(offset + size, obj.size)
        if offset >= end:
            return b""
        csize = self.chunk_size(obj)
        oid = object_id(obj.key, obj.etag, obj.size)
        pieces: list[bytes] = []
        from_cache = from_source = 0
        until = time.monotonic() + self.tuning.read_wait if bounded else None
        pos = offset
        while pos < end:
            index, within = divmod(pos, csize)
            length = min(end - pos, csize - within)
            chunk = chunk_of(oid, obj.size, index, csize)
            piece = self.store.read(chunk, within, length)
            if piece is not None and len(piece) == length:
                if index in state.sourced:
                    # Fetched for this very reader (by an earlier read or by read-ahead):
                    # these bytes came from the source, however many reads they take.
                    from_source += length
                else:
                    from_cache += length
            else:
                data = self._fill_waiting(obj, chunk, csize, until) if until else self._fill(
                    obj, chunk, csize, demand=True)
                state.sourced.update(self.verifier.take_assembled(chunk.object_id))
                piece = data[within : within + length] if data is not None else None
                if piece is None:  # filled by another reader just now
                    piece = self.store.read(chunk, within, length)
                if piece is None or len(piece) != length:
                    raise OSError(f"cache lost chunk {chunk.name} of {obj.key} while reading")
                state.sourced.add(index)
                from_source += length
            pieces.append(piece)
            pos += length
        if prepaid:
            self.counters.add_prepaid_read(from_source, pid)
        else:
            self.counters.add_read(from_cache, from_source, pid)
        if offset == state.next_offset and obj.size > csize:
            self._schedule_readahead(state, end, csize, oid)
        state.next_offset = end
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _schedule_readahead(self, state: ReadState, end: int, csize: int, oid: str) -> None:
        last = (state.obj.size - 1) // csize
        current = (end - 1) // csize
        want = min(last, current + self.tuning.readahead_chunks)
        start = max(current + 1, state.readahead_until)
        for index in range(start, want + 1):
            chunk = chunk_of(oid, state.obj.size, index, csize)
            if chunk.name not in self._inflight and not self.store.contains(chunk):
                # Marked before the fetch starts: the reader may get there before it ends.
                state.sourced.add(index)
                self._readahead.submit(self._fill_quietly, state, chunk, csize)
        state.readahead_until = max(state.readahead_until, want + 1)

    def _fill_quietly(self, state: ReadState, chunk: ChunkId, csize: int) -> None:
        try:
            self._fill(state.obj, chunk, csize, demand=True)
        except Exception as exc:  # noqa: BLE001 - the reader will retry on demand and report
            log.debug("read-ahead of %s failed: %s", state.obj.key, exc)

    # -- fills -----------------------------------------------------------------------------
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

    def recheck_room(self) -> bool:
        """Clear ``degraded`` once the store finds room again on its own (``ChunkStore.recheck_room``);
        True if it just did. The files read through meanwhile are cached when next read (their
        opens are not answered from the page cache: only opens of cached files keep it)."""
        if not self.store.recheck_room():
            return False
        if self.counters.degraded:
            self.counters.set_degraded(None)
        return True

    def close(self) -> None:
        self._readahead.close()
        self._fetchers.close()
        self.verifier.close()
