"""Reads of dataset files through the chunk cache: the worker's hot path.

A read is split at chunk boundaries; each piece is served from the store (a *hit*) or fetched
from the source, checked against what the store vouches for (verify.py: a large object is
checked whole before any of it is served), stored and served (a *miss*). Concurrent readers of one missing chunk share
one fetch (single flight). Sequential readers of a large file trigger read-ahead of the next
chunks. Warming goes through the same fill path but yields to application reads through
:class:`.fetch_priority.Priority`.

:class:`DatasetCache` is put together from the read path here and its fills
(:mod:`.dataset_fill`: single flight, the bounds on readers waiting for the source, abandoned
fetches); its knobs are :class:`.dataset_tuning.Tuning`, its threads :mod:`.fetchers`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from .counters import Counters
from .dataset_fill import DatasetFills, _Flight
from .dataset_tuning import Tuning
from .fetch_priority import Priority, RateLimiter
from .fetchers import Fetchers
from .source import RemoteObject, Source
from .store import ChunkId, ChunkStore, chunk_of, object_id
from .verify import Verifier

log = logging.getLogger(__name__)


@dataclass
class ReadState:
    """Per open file: where a sequential reader is, how far read-ahead has gone, and which
    chunks were fetched from the source on its behalf (so re-reads of them are not hits)."""

    obj: RemoteObject
    next_offset: int = 0
    readahead_until: int = 0
    sourced: set[int] = field(default_factory=set)


class DatasetCache(DatasetFills):
    """Reads of one dataset through the chunk cache (module docstring); fills are in
    :mod:`.dataset_fill`."""

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

    def touch(self, obj: RemoteObject) -> None:
        """``obj`` was opened for the kernel to read without us (passthrough): it is in use."""
        oid = object_id(obj.key, obj.etag, obj.size)
        count = max(1, -(-obj.size // self.chunk_size(obj)))
        self.store.touch(f"{oid}.{i}" for i in range(count))

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
