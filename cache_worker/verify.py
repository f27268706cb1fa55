"""No byte is served or cached before something the store vouches for has checked it.

The rule, per object (``DatasetCache._fill`` hands every fetch here):

1. A small object (one chunk) fetched whole is checked in the same response where the store
   allows it (S3: the MD5 ETag, or a FULL_OBJECT ``x-amz-checksum-*``), else against
   :meth:`Source.evidence` (S3: the multipart ETag or a COMPOSITE checksum recomputed from the
   part layout; HDFS: ``GETFILECHECKSUM``).
2. A large object (several chunks) can only be checked whole: S3 sends no checksum for a range,
   HDFS none for part of a file. So, up to ``Tuning.check_whole_max`` (1 GiB) and half the
   cache, the first read of any chunk of it fetches *every* chunk not cached yet (in
   parallel), keeps them under a separate *unverified* name in the store (never served, never
   mistaken for a real chunk after a restart), checks the whole object, and only then renames
   them into place and answers the read. A reader therefore never sees a byte of such an
   object before the whole object matched; the price is that the first read of it waits for
   all of it (warming and sequential readers, which read all of it anyway, pay little extra).
   A larger object is served chunk by chunk as it arrives, *before* any check (a random read
   into a 10 GB file must not fetch 10 GB); it is counted in ``unverified_objects``, and once
   every chunk of it is cached it is checked whole in the background: on a mismatch every
   chunk of it is dropped (and counted), so wrong bytes are not kept, though some may have
   been served.
3. On a mismatch every unverified chunk of the object is dropped and the object is fetched again,
   ``ATTEMPTS`` times in all; then the read fails (EIO) naming the object. Wrong bytes are never
   kept. A mismatch against a *guessed* multipart layout is first rechecked against the exact one.
4. When nothing can vouch for an object (S3 SSE-KMS/SSE-C without an additional checksum, a
   multipart object whose part layout cannot be found, a store without checksums) or there is
   no room to hold it whole, its bytes are served and cached as they arrive, as before, and the
   object is counted in ``unverified_objects`` (``datahoard status``), the reason in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from .integrity import Evidence, verify
from .source import RemoteObject, SourceTransientError
from .store import CacheFull, ChunkId, object_id

if TYPE_CHECKING:
    from .dataset import DatasetCache

log = logging.getLogger(__name__)

#: Whole fetches of one object before a persistent mismatch is an error.
ATTEMPTS = 3
#: Chunk fetches at once while assembling large objects for their check (at least; warming's
#: parallelism if larger, since warming a dataset of large files goes through here).
_PARALLEL = 4
#: Evidence remembered per object (one HEAD or GETFILECHECKSUM each, so worth keeping).
_EVIDENCE_CACHE = 4096
#: Suffix of the object id under which chunks wait for their object's check.
UNVERIFIED = "-unverified"


#: Assembled objects remembered for their readers (see Verifier._assembled).
_ASSEMBLED_MAX = 1024


class _Lost(Exception):
    """An unverified chunk was evicted before its object could be checked: assemble again."""


class Verifier:
    def __init__(self, cache: "DatasetCache") -> None:
        self.cache = cache
        self._evidence: OrderedDict[str, Evidence] = OrderedDict()
        self._unverified_seen: set[str] = set()
        self._lock = threading.Lock()
        self._object_locks: dict[str, list] = {}  # oid -> [lock, users]
        self._pool = ThreadPoolExecutor(max_workers=max(_PARALLEL, cache.tuning.warm_parallelism),
                                        thread_name_prefix="verify-fetch")
        #: Whole-object checks of objects served before their check (one at a time: local reads).
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-check")
        #: Chunks fetched to check an object whole, by object id, until the reader that caused
        #: the fetch takes them (take_assembled). Not thread-local: the fetch runs on a fetcher
        #: thread while the FUSE reader waits (dataset.py). Bounded: a reader that failed never
        #: takes its entry.
        self._assembled: OrderedDict[str, set[int]] = OrderedDict()
        self._check_queued: set[str] = set()
        cache.source.on_mismatch = cache.counters.add_mismatch

    # -- the hook --------------------------------------------------------------------------
    def fetch_and_store(self, obj: RemoteObject, chunk: ChunkId, csize: int, demand: bool) -> bytes:
        """Bytes of ``chunk`` once its object was checked (see the module docstring), stored."""
        if obj.size <= csize:
            data = self._whole(obj, demand)
            self.cache._put(chunk, data)
            return data
        return self._large(obj, chunk, csize, demand)

    # -- small objects ---------------------------------------------------------------------
    def _whole(self, obj: RemoteObject, demand: bool) -> bytes:
        for attempt in range(1, ATTEMPTS + 1):
            got = self.cache._fetch(obj, 0, obj.size, demand)
            if got.verified:
                return got.data
            evidence = self.evidence(obj)
            if evidence.check is None:
                self._unverified(obj, evidence.reason)
                return got.data
            if self._matches(obj, evidence, lambda: iter((got.data,))):
                return got.data
            self._mismatch(obj, evidence, attempt)
        raise self._failed(obj)

    # -- large objects ---------------------------------------------------------------------
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

    def check_limit(self) -> int:
        """Objects larger than this are served before their whole-object check (rule 2)."""
        return min(self.cache.tuning.check_whole_max, self.cache.store.capacity // 2)

    def queue_check(self, obj: RemoteObject, csize: int, evidence: Evidence | None = None) -> None:
        """At most one queued check per object: a warmed 10 GB object must not queue 1,250.
        Without ``evidence`` it is looked up on the checking thread (not the caller's)."""
        oid = object_id(obj.key, obj.etag, obj.size)
        with self._lock:
            if oid in self._check_queued:
                return
            self._check_queued.add(oid)
        try:
            self._checks.submit(self._check_when_complete, obj, csize, evidence)
        except RuntimeError:  # shutting down: checked by a later process, once complete
            with self._lock:
                self._check_queued.discard(oid)

    def _check_when_complete(self, obj: RemoteObject, csize: int, evidence: Evidence | None) -> None:
        """An object too large to check before serving: once all of it is cached, check it, and
        drop every chunk of it if it does not match (what was served is already served). A
        match is recorded in the store: from then on the object may be passed through."""
        oid = object_id(obj.key, obj.etag, obj.size)
        with self._lock:  # a fill from now on queues a new check
            self._check_queued.discard(oid)
        store = self.cache.store
        chunks = list(self._chunks(obj, csize))
        if not all(store.contains(real) for real, _, _, _ in chunks):
            return
        if evidence is None:
            try:
                evidence = self.evidence(obj)
            except Exception as exc:  # noqa: BLE001 - a background check; the next open retries
                log.warning("checking %s failed: %s", obj.key, exc)
                return
        if evidence.check is None:  # nothing can vouch for it: served unchecked all along (rule 4)
            store.mark_checked(oid)
            return
        with self._object_lock(chunks[0][0].object_id):
            try:
                ok = self._matches(obj, evidence, lambda: self._pieces(obj, csize))
            except _Lost:  # evicted meanwhile: checked when it is complete again
                return
            except Exception as exc:  # noqa: BLE001 - a background check; the next fill retries
                log.warning("checking %s failed: %s", obj.key, exc)
                return
            if ok:
                store.mark_checked(oid)
                return
            for real, _, _, _ in chunks:
                if store.contains(real):
                    store.discard(real.name)
            self._mismatch(obj, evidence, 1, served=True)

    def take_assembled(self, oid: str) -> set[int]:
        """Chunks of ``oid`` just fetched to check their object whole (so the reader
        that caused it counts them as bytes from the source, not as hits)."""
        with self._lock:
            return self._assembled.pop(oid, set())

    def _unchecked(self, obj: RemoteObject, chunk: ChunkId, start: int, length: int,
                   demand: bool, reason: str) -> bytes:
        data = self.cache._fetch(obj, start, length, demand).data
        self._unverified(obj, reason)
        self.cache._put(chunk, data)
        return data

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

    # -- evidence and bookkeeping ------------------------------------------------------------
    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        oid = object_id(obj.key, obj.etag, obj.size)
        with self._lock:
            known = self._evidence.get(oid)
            if known is not None and not exact:
                self._evidence.move_to_end(oid)
                return known
        found = self.cache.source.evidence(obj, exact=exact)
        with self._lock:
            self._evidence[oid] = found
            while len(self._evidence) > _EVIDENCE_CACHE:
                self._evidence.popitem(last=False)
        return found

    def _matches(self, obj: RemoteObject, evidence: Evidence, pieces) -> bool:
        assert evidence.check is not None
        if verify(evidence.check, obj.size, pieces()):
            return True
        if not evidence.check.guessed:
            return False
        exact = self.evidence(obj, exact=True)
        return exact.check is not None and verify(exact.check, obj.size, pieces())

    def _mismatch(self, obj: RemoteObject, evidence: Evidence, attempt: int, served: bool = False) -> None:
        if served:
            message = (f"{obj.key} did not match {evidence.check.label} once all of it was cached: "
                       f"bytes were corrupted in transit and some may have been served; every "
                       f"chunk of it was dropped")
        else:
            message = (f"{obj.key} did not match {evidence.check.label} (attempt {attempt}/{ATTEMPTS}): "
                       f"bytes were corrupted in transit; dropped, fetching again")
        log.error(message)
        self.cache.counters.add_mismatch(message)

    def _failed(self, obj: RemoteObject) -> SourceTransientError:
        return SourceTransientError(
            f"checksum mismatch reading {obj.key}: {ATTEMPTS} whole fetches did not match what the "
            f"store vouches for (something between here and the store corrupts data?)")

    def _unverified(self, obj: RemoteObject, reason: str) -> None:
        oid = object_id(obj.key, obj.etag, obj.size)
        with self._lock:
            if oid in self._unverified_seen:
                return
            self._unverified_seen.add(oid)
        log.warning("serving %s unchecked: %s", obj.key, reason)
        self.cache.counters.add_unverified()

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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._checks.shutdown(wait=False, cancel_futures=True)
