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

The rules are carried out by the parts of :class:`Verifier`: small objects here, large ones
checked before serving in :mod:`.verify_assemble`, those checked after serving in
:mod:`.verify_later`, evidence, mismatches and unverified objects in :mod:`.verify_evidence`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .integrity import Evidence
from .source import RemoteObject
from .store import ChunkId
from .verify_assemble import _PARALLEL, UNVERIFIED, VerifyAssembly
from .verify_evidence import ATTEMPTS, VerifyEvidence
from .verify_later import VerifyLater

if TYPE_CHECKING:
    from .dataset import DatasetCache

__all__ = ["ATTEMPTS", "UNVERIFIED", "Verifier"]


class Verifier(VerifyAssembly, VerifyLater, VerifyEvidence):
    """Checks every fetch before it is served or cached (module docstring); the methods are in
    the parts named there."""

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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._checks.shutdown(wait=False, cancel_futures=True)
