"""Objects too large to check before serving (over ``Tuning.check_whole_max`` or half the
cache, rule 2 of ``verify.py``): served chunk by chunk as they arrive, then checked whole in the
background once every chunk is cached; on a mismatch every chunk is dropped. A match is recorded
in the store, so the object may then be passed through. A part of :class:`.verify.Verifier`,
which sets up the state in ``__init__``.
"""

from __future__ import annotations

import logging

from .integrity import Evidence
from .source import RemoteObject
from .store import object_id
from .verify_assemble import _Lost

log = logging.getLogger("datahoard.cache_worker.verify")  # one log for verification, as before the split


class VerifyLater:
    """Checks queued for objects served before their check, one at a time.
    A part of :class:`.verify.Verifier`, which sets up the state in ``__init__``."""

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

