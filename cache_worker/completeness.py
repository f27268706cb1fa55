"""The "fully cached" event: tells the worker when the last missing chunk of the dataset is
cached, and when an eviction (or a chunk found corrupt or gone) makes it not fully cached.

Before this, two threads of the worker polled every second and walked the whole index asking
"is everything cached?" (issue 16). Now the store reports each change to its set of cached
chunks (``ChunkStore.on_change``, called under the store's lock, so the callback only records
the names and wakes this module's thread), and this thread decides:

- while the store holds fewer bytes than the dataset, it cannot be complete: nothing to walk,
  and a fill does not even wake the thread (a warm-up costs a lock and a comparison per chunk:
  3 us measured on the loaded 2-core test machine, beside a chunk fill's milliseconds);
- once it holds as many, one walk of the index collects the chunks still missing; from then on
  each newly cached chunk is crossed off that set, so the walk is not repeated per fill (the
  walk costs about as much as the old poll; it now runs once, not once a second);
- a chunk leaving the store forgets the set: the next wake-up walks again (evictions are rare
  once a dataset fits; a dataset that does not fit never gets past the byte test).

Listeners are called on this module's thread, outside every lock, on each change of state:
``True`` when the dataset became fully cached, ``False`` when it stopped being so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from .dataset import DatasetCache
from .index import Index

log = logging.getLogger(__name__)

Listener = Callable[[bool], None]


class Completeness:
    """Watches one dataset's cache and reports "fully cached" changes to listeners."""

    def __init__(self, index: Index, cache: DatasetCache) -> None:
        self._index = index
        self._cache = cache
        self._store = cache.store
        self._total = index.total_bytes
        self._cond = threading.Condition()
        self._woken = True  # the first pass decides the state found at start-up
        self._stopped = False
        #: Chunks newly cached since the thread last looked (crossed off ``_missing``).
        self._added: set[str] = set()
        #: A chunk left the store since the last walk: ``_missing`` no longer tells the truth.
        self._stale = True
        #: Chunks of the dataset not cached, as of the last walk minus those added since.
        self._missing: set[str] | None = None
        #: The thread is walking the index: every chunk cached meanwhile must be crossed off.
        self._walking = False
        #: ``settle`` is judging a change or telling listeners (``busy``).
        self._settling = False
        self._listeners: list[Listener] = []
        self._full = False
        self._decided = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the store's side (under its lock: record and wake, nothing else) --------------------
    def _on_change(self, names: Iterable[str], added: bool) -> None:
        """Only what can change the answer wakes the thread: while the store holds fewer bytes
        than the dataset (the whole of a warm-up) a fill costs this lock and a comparison, not
        a thread switch per chunk."""
        with self._cond:
            if added:
                if self._full:
                    return  # still full
                if self._walking:
                    pass  # the walk may have seen any chunk missing: keep every name
                elif self._missing is None or self._stale:
                    if self._store.used_bytes < self._total:
                        return  # cannot be complete yet
                else:
                    names = [n for n in names if n in self._missing]
                    if not names:
                        return  # not one the dataset lacks (another object, a leftover)
                self._added.update(names)
            else:
                if not self._full and self._missing is None:
                    return  # not full, and the next look walks anyway
                self._stale = True
            self._woken = True
            self._cond.notify()

    # -- the worker's side -----------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(full)`` on each change; at once too if the state is known and full."""
        with self._cond:
            self._listeners.append(listener)
            call_now = self._decided.is_set() and self._full
        if call_now:
            listener(True)

    @property
    def full(self) -> bool:
        return self._full

    @property
    def busy(self) -> bool:
        """A change is waiting to be judged, or is being judged and its listeners told: the
        state ``full`` shows may be about to change (``--warm --wait`` waits on this)."""
        with self._cond:
            return self._woken or self._settling

    def wait_decided(self, timeout: float) -> bool:
        """Wait until the state found at start-up is known (tests, and status right after start)."""
        return self._decided.wait(timeout)

    def replace_index(self, index: Index) -> None:
        """Judge against ``index`` from now on (a refresh): the next look walks it afresh, and
        listeners hear "no longer fully cached" if it brought files not cached yet."""
        with self._cond:
            self._index = index
            self._total = index.total_bytes
            self._stale = True
            self._missing = None
            self._added.clear()
            self._woken = True
            self._cond.notify()

    def attach(self) -> None:
        """Hear the store's changes (``start`` does this; tests that ``settle`` by hand too)."""
        self._store.on_change = self._on_change

    def start(self) -> None:
        self.attach()
        self._thread = threading.Thread(target=self._run, name="completeness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._store.on_change == self._on_change:
            self._store.on_change = None
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._woken and not self._stopped:
                        self._cond.wait()  # no timeout: only a change of the store wakes it
                    if self._stopped:
                        return
                self.settle()
        except Exception:  # noqa: BLE001 - reported; serving goes on without the event
            log.exception("watching for a fully cached dataset failed")

    def settle(self) -> None:
        """Decide on every change reported so far, calling listeners on a change of state.

        The thread's body; tests call it directly (with the thread not started) to see each
        decision without waiting for a thread."""
        try:
            while True:
                with self._cond:
                    if not self._woken:
                        self._settling = False
                        return
                    self._woken, self._settling = False, True
                full = self._check()
                if full is None:
                    continue
                self._decided.set()
                if full != self._full:
                    self._full = full
                    log.info("the dataset is %s", "fully cached" if full else "no longer fully cached")
                    for listener in list(self._listeners):
                        try:
                            listener(full)
                        except Exception:  # noqa: BLE001 - one listener must not silence the others
                            log.exception("a fully-cached listener failed")
        except BaseException:
            with self._cond:
                self._settling = False
            raise

    def _check(self) -> bool | None:
        """Is every chunk of the dataset cached? None: the answer went stale while looking."""
        if self._store.used_bytes < self._total:  # cheap test first
            with self._cond:
                self._added.clear()
                self._missing = None
            return False
        with self._cond:
            walk = self._stale or self._missing is None
            self._stale = False
            self._walking = walk
            added, self._added = self._added, set()
        if walk:
            missing = set()
            for obj in self._index.walk_files():
                if self._stopped:  # shutting down: the store is about to close
                    with self._cond:
                        self._walking = False
                    return None
                if obj.size == 0:
                    continue  # nothing to cache: a read of it stores nothing, the kernel needs no data
                missing.update(c.name for c in self._cache.chunks(obj) if not self._store.contains(c))
        else:
            missing = self._missing - added
        with self._cond:
            self._walking = False
            if self._stale:  # a chunk left while walking: look again
                self._woken = True
                return None
            missing -= self._added  # cached while walking
            self._added.clear()
            self._missing = missing
        return not missing


__all__ = ["Completeness"]
