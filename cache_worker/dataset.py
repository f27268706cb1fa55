"""Reads of dataset files through the chunk cache: the worker's hot path.

A read is split at chunk boundaries; each piece is served from the store (a *hit*) or fetched
from the source, checked against what the store vouches for (verify.py: a large object is
checked whole before any of it is served), stored and served (a *miss*). Concurrent readers of one missing chunk share
one fetch (single flight). Sequential readers of a large file trigger read-ahead of the next
chunks. Warming goes through the same fill path but yields to application reads through
:class:`Priority`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .counters import Counters
from .source import Fetched, RemoteObject, Source
from .store import CacheFull, ChunkId, ChunkStore, object_id
from .verify import Verifier

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class Tuning:
    #: Objects up to this size are fetched and stored whole: one request, one file, and the
    #: unit the kernel page cache accounting (see fuse_view) relies on.
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
        self._inflight: dict[str, Future[bytes | None]] = {}
        self._lock = threading.Lock()
        self._readahead = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readahead")
        self.verifier = Verifier(self)

    # -- layout ----------------------------------------------------------------------------
    def chunk_size(self, obj: RemoteObject) -> int:
        return max(obj.size, 1) if obj.size <= self.tuning.whole_file_max else self.tuning.chunk_size

    def chunks(self, obj: RemoteObject) -> list[ChunkId]:
        oid = object_id(obj.key, obj.etag, obj.size)
        size = self.chunk_size(obj)
        count = max(1, -(-obj.size // size))
        return [ChunkId(oid, i) for i in range(count)]

    def is_cached(self, obj: RemoteObject) -> bool:
        return all(self.store.contains(c) for c in self.chunks(obj))

    # -- reads -----------------------------------------------------------------------------
    def read(self, state: ReadState, offset: int, size: int, prepaid: bool = False) -> bytes:
        """Up to ``size`` bytes of ``state.obj`` at ``offset``, exactly as the source has them.

        ``prepaid``: the caller already counted these bytes as served from cache (an open of a
        file known to be cached, see fuse_view); only bytes that needed the source are counted,
        moved from the cache column to the source column.
        """
        obj = state.obj
        end = min(offset + size, obj.size)
        if offset >= end:
            return b""
        csize = self.chunk_size(obj)
        oid = object_id(obj.key, obj.etag, obj.size)
        pieces: list[bytes] = []
        from_cache = from_source = 0
        pos = offset
        while pos < end:
            index, within = divmod(pos, csize)
            length = min(end - pos, csize - within)
            chunk = ChunkId(oid, index)
            piece = self.store.read(chunk, within, length)
            if piece is not None and len(piece) == length:
                if index in state.sourced:
                    # Fetched for this very reader (by an earlier read or by read-ahead):
                    # these bytes came from the source, however many reads they take.
                    from_source += length
                else:
                    from_cache += length
            else:
                data = self._fill(obj, chunk, csize, demand=True)
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
            self.counters.add_prepaid_read(from_source)
        else:
            self.counters.add_read(from_cache, from_source)
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
            chunk = ChunkId(oid, index)
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

    def _fill(self, obj: RemoteObject, chunk: ChunkId, csize: int, demand: bool) -> bytes | None:
        """Fetch, verify and store one chunk, once however many threads ask at the same time.

        Returns the chunk's bytes, or None when it turned out to be cached already.
        """
        with self._lock:
            flight = self._inflight.get(chunk.name)
            owner = flight is None
            if owner:
                flight = self._inflight[chunk.name] = Future()
        if not owner:
            return flight.result()
        try:
            data = None
            if not self.store.contains(chunk):
                data = self.verifier.fetch_and_store(obj, chunk, csize, demand)
            flight.set_result(data)
            return data
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()  # mark retrieved: waiters may not exist
            raise
        finally:
            with self._lock:
                del self._inflight[chunk.name]

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

    def close(self) -> None:
        self._readahead.shutdown(wait=False, cancel_futures=True)
        self.verifier.close()
