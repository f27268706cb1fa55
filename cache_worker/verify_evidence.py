"""What vouches for an object, and what happens when it does not match or nothing vouches:
rules 3 and 4 of ``verify.py``. A part of :class:`.verify.Verifier`, which sets up the state in
``__init__``.

Evidence is looked up once per object and remembered (one HEAD or GETFILECHECKSUM each); a
mismatch against a *guessed* multipart layout is rechecked against the exact one before it
counts. An object nothing can vouch for is served as it arrives and counted once in
``unverified_objects``, the reason in the log.
"""

from __future__ import annotations

import logging

from .integrity import Evidence, verify
from .source import RemoteObject, SourceTransientError
from .store import ChunkId, object_id

log = logging.getLogger("datahoard.cache_worker.verify")  # one log for verification, as before the split

#: Whole fetches of one object before a persistent mismatch is an error.
ATTEMPTS = 3
#: Evidence remembered per object (one HEAD or GETFILECHECKSUM each, so worth keeping).
_EVIDENCE_CACHE = 4096


class VerifyEvidence:
    """Evidence, matching, mismatches and objects served unchecked.
    A part of :class:`.verify.Verifier`, which sets up the state in ``__init__``."""

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

    def _unchecked(self, obj: RemoteObject, chunk: ChunkId, start: int, length: int,
                   demand: bool, reason: str) -> bytes:
        data = self.cache._fetch(obj, start, length, demand).data
        self._unverified(obj, reason)
        self.cache._put(chunk, data)
        return data

