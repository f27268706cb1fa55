"""A large object checked whole before any byte of it is served (rule 2 of ``verify.py``): every
chunk not cached yet is fetched in parallel under its *unverified* twin's name, the whole object
is checked, and only then are the chunks renamed into place (``ChunkStore.adopt``) or copied
there. A part of :class:`.verify.Verifier`, which sets up the state in ``__init__``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, wait
from contextlib import contextmanager

from .source import RemoteObject, SourceTransientError
from .store import CacheFull, ChunkId, object_id
from .verify_evidence import ATTEMPTS

log = logging.getLogger("datahoard.cache_worker.verify")  # one log for verification, as before the split

#: Chunk fetches at once while assembling large objects for their check (at least; warming's
#: parallelism if larger, since warming a dataset of large files goes through here).
_PARALLEL = 4
#: Suffix of the object id under which chunks wait for their object's check.
UNVERIFIED = "-unverified"


#: Assembled objects remembered for their readers (see Verifier._assembled).
_ASSEMBLED_MAX = 1024


class _Lost(Exception):
    """An unverified chunk was evicted before its object could be checked: assemble again."""


class VerifyAssembly:
    """Assembling, checking and promoting large objects, one assembly per object at a time.
    A part of :class:`.verify.Verifier`, which sets up the state in ``__init__``."""

    def _large(self, obj: RemoteObject, chunk: ChunkId, csize: int, demand: bool) -> bytes:
        start = chunk.index * csize
        length = min(csize, obj.size - start)
        evidence = self.evidence(obj)
        if evidence.check is None:
            return self._unchecked(obj, chunk, start, length, demand, evidence.reason)
        limit = self.check_limit()
        if obj.size > limit:
            data = self._unchecked(obj, chunk, start, length, demand,
                                   f"larger than {limit} bytes: served as it arrives, checked "
                                   f"once all of it is cached")
            self.queue_check(obj, csize, evidence)
            return data
        oid = chunk.object_id
        with self._object_lock(oid):
            data = self.cache.store.read(chunk, 0, length)  # checked and stored while we waited
            if data is not None and len(data) == length:
                return data
            attempt = lost = 0
            chunk_count = -(-obj.size // csize)
            while attempt < ATTEMPTS:
                try:
                    fetched = self._assemble(obj, csize, demand)
                    ok = self._matches(obj, evidence, lambda: self._pieces(obj, csize))
                except _Lost:
                    # A chunk kept under its real name was gone or corrupt when read back (it is
                    # dropped then): fetch it on the next round. Not a mismatch, so it does not
                    # spend an attempt, but bounded: each chunk can be lost once per attempt.
                    lost += 1
                    if lost > chunk_count * ATTEMPTS:
                        raise SourceTransientError(
                            f"reading {obj.key}: its cached chunks kept changing while it was checked "
                            f"({lost} times); it is read from the source again next time") from None
                    continue
                except CacheFull as exc:
                    self._drop_unverified(obj, csize)
                    return self._unchecked(obj, chunk, start, length, demand,
                                           f"no room to hold it whole for its check ({exc})")
                attempt += 1
                if ok:
                    with self._lock:
                        self._assembled[oid] = fetched
                        while len(self._assembled) > _ASSEMBLED_MAX:
                            self._assembled.popitem(last=False)
                    return self._promote(obj, csize, chunk.index)
                self._drop_unverified(obj, csize)
                self._mismatch(obj, evidence, attempt)
            raise self._failed(obj)

    def take_assembled(self, oid: str) -> set[int]:
        """Chunks of ``oid`` just fetched to check their object whole (so the reader
        that caused it counts them as bytes from the source, not as hits)."""
        with self._lock:
            return self._assembled.pop(oid, set())

    def _chunks(self, obj: RemoteObject, csize: int) -> Iterator[tuple[ChunkId, ChunkId, int, int]]:
        """(chunk, its unverified twin, start, length) of every chunk of ``obj``."""
        oid = object_id(obj.key, obj.etag, obj.size)
        for index in range(-(-obj.size // csize)):
            start = index * csize
            length = min(csize, obj.size - start)
            yield (ChunkId(oid, index, start, obj.size, length), ChunkId(oid + UNVERIFIED, index, start, obj.size, length),
                   start, length)

    def _assemble(self, obj: RemoteObject, csize: int, demand: bool) -> set[int]:
        """Fetch every chunk of ``obj`` neither cached nor waiting, into its unverified name;
        the indexes fetched."""
        store = self.cache.store

        def fetch(twin: ChunkId, start: int, length: int) -> None:
            store.put(twin, self.cache._fetch(obj, start, length, demand).data)

        missing = [(twin, start, length) for real, twin, start, length in self._chunks(obj, csize)
                   if not store.contains(real) and not store.contains(twin)]
        futures = [self._pool.submit(fetch, *m) for m in missing]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        wait(pending)
        for future in futures:
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()
        return {twin.index for twin, _, _ in missing}

    def _pieces(self, obj: RemoteObject, csize: int) -> Iterator[bytes]:
        store = self.cache.store
        for real, twin, _, length in self._chunks(obj, csize):
            data = store.read(twin, 0, length)
            if data is None:
                data = store.read(real, 0, length)
            if data is None or len(data) != length:
                raise _Lost()
            yield data

    def _promote(self, obj: RemoteObject, csize: int, wanted: int) -> bytes:
        """Move every checked chunk of ``obj`` to its real name; the bytes of chunk ``wanted``.

        When none of the object was cached under its real name (the usual case: a first read),
        the twin's file is renamed (``ChunkStore.adopt``): no byte is copied. Otherwise the
        twin's chunks are copied into the real file, which others may be reading."""
        store = self.cache.store
        chunks = list(self._chunks(obj, csize))
        if store.adopt(chunks[0][1].object_id, chunks[0][0].object_id):
            real, _, _, length = chunks[wanted]
            result = store.read(real, 0, length)
            if result is None or len(result) != length:
                raise SourceTransientError(f"cache lost a chunk of {obj.key} while checking it")
            return result
        result = b""
        for real, twin, _, length in chunks:
            data = store.read(twin, 0, length)
            if data is not None:
                self.cache._put(real, data)
            elif real.index == wanted:
                data = store.read(real, 0, length)
            if real.index == wanted:
                result = data
        # After every copy: the unverified twin is one file, dropped whole once complete.
        self._drop_unverified(obj, csize)
        if result is None or len(result) != min(csize, obj.size - wanted * csize):
            raise SourceTransientError(f"cache lost a chunk of {obj.key} while checking it")
        return result

    def _drop_unverified(self, obj: RemoteObject, csize: int) -> None:
        for _, twin, _, _ in self._chunks(obj, csize):
            if self.cache.store.contains(twin):
                self.cache.store.discard(twin.name)

    @contextmanager
    def _object_lock(self, oid: str) -> Iterator[None]:
        """One assembly per object at a time; the lock is forgotten when nobody holds it.

        An assembly that has held the lock for longer than a reader may wait
        (``Tuning.read_wait``) is stuck on the source: its readers have given up and their
        flights were abandoned (dataset.py), so a later reader must not queue behind it. It
        assembles beside the stuck one instead; both write the same checked bytes through
        atomic puts, so whichever finishes second changes nothing.
        """
        with self._lock:
            entry = self._object_locks.setdefault(oid, [threading.Lock(), 0, 0.0])
            entry[1] += 1
        held_for = time.monotonic() - entry[2] if entry[2] else 0.0
        got = entry[0].acquire(timeout=max(0.0, self.cache.tuning.read_wait - held_for))
        if got:
            entry[2] = time.monotonic()
        else:
            log.warning("an earlier check of %s is stuck on the source; fetching it afresh", oid)
        try:
            yield
        finally:
            if got:
                entry[2] = 0.0
                entry[0].release()
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._object_locks.pop(oid, None)

