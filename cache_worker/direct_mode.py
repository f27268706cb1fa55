"""Serving from a direct tree (step 6 of ``worker.run``): reuse or build the tree once the
dataset is fully cached (the completeness event, the same one that turns on kernel opens: one
answer to "is everything cached?"), publish it (mount record, bind over the mountpoint), keep it whole
(relink chunks found corrupt, drop unused trees), and notice when its bind is taken off.

Opens of the tree are counted as kernel opens are (direct_opens.py): its watch starts before
the tree is bound, so every open through the bind (or a pod's) counts.

The tree's own progress is ``DirectStats.state``: waiting, verifying, building, ready, failed
(off without ``direct``). Binding it or losing the bind moves the serving mode (serving.py).

The thread sleeps until something changes (wakeup.py): the dataset became fully cached,
warming ended, a chunk of the tree was found corrupt, shutdown; while its bind is over the
mountpoint or an old tree waits to be removed, a mount table changed; while an old tree waits,
one of its reference files (``direct/<id>.refs/*``) was removed. It used to wake every 0.2 s
whatever happened, and look for old trees to remove every 30 s; that timer is left only where
the kernel refuses an inotify instance (``_OLD_TREE_SECONDS``, while an old tree waits).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from datahoard.mounts import bind_readonly, detach, mounts_at
from datahoard.stats import DirectStats

from .completeness import Completeness
from .counters import Counters
from .direct_opens import DirectOpens
from .serving import Event, ServingMode
from .store import ChunkStore
from .tree import DirectTrees
from .tree_bind import clear_tree_binds
from .tree_bind import top_is_tree_bind as _top_is_tree_bind
from .tree_errors import TreeError
from .tree_manifest import TreeInfo
from .wakeup import Wakeup

log = logging.getLogger(__name__)

#: How often to look again for the references of old trees while one waits, where inotify
#: is refused (module docstring): the old cleanup period.
_OLD_TREE_SECONDS = 30.0


class DirectServing:
    """The direct-tree thread of one worker and what it reports."""

    def __init__(self, source: str, mountpoint: Path, bind: bool, trees: DirectTrees, store: ChunkStore,
                 completeness: Completeness, counters: Counters, mode: ServingMode, stop: threading.Event,
                 warming: Callable[[], bool], publish: Callable[[str], None]) -> None:
        self._source, self._mountpoint, self._bind = source, mountpoint, bind
        self.trees, self._store, self._counters = trees, store, counters
        #: Counts the opens of the served tree (hits, as kernel opens count them).
        self.opens = DirectOpens(counters.add_unobserved_hit)
        #: Bumped each time the dataset becomes fully cached: a build that failed is tried
        #: again only after the cache changed and became whole again.
        self._fully_cached = 0
        #: What the thread sleeps on (wakeup.py); created first: no wake-up may be lost.
        self._wakeup = Wakeup()
        trees.on_repair = self._wakeup.wake
        completeness.subscribe(self._on_fully_cached)
        self._mode, self._stop = mode, stop
        #: True while a warmer of this worker is running (no build until it is done; the warmer's
        #: end calls ``wake``).
        self._warming = warming
        #: Record the tree's path in the mount record (the CSI node plugin binds it into pods).
        self._publish = publish
        self.stats = DirectStats(state="waiting")
        self.bound = False
        #: The last completeness bump a build was tried for (``_should_build``).
        self._last_attempt: int | None = None
        #: Ids of trees of earlier snapshots still on disk, kept while something references them.
        self._old_trees: set[str] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="direct", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something the thread waits for may have changed (warming ended, shutdown)."""
        self._wakeup.wake()

    @property
    def wakeups(self) -> int:
        """How many times the thread woke up since it started (tests: none while nothing changes)."""
        return self._wakeup.count

    @property
    def sleeping(self) -> bool:
        """The thread is waiting for an event, every watch in place (tests: a change made now
        is one it is told of)."""
        return self._wakeup.waiting

    @property
    def wait_limit(self) -> float | None:
        """The time limit of the thread's last sleep; None: it sleeps until an event."""
        return self._wakeup.timeout

    def join(self, timeout: float) -> None:
        """After ``stop`` is set: wake the thread so that it sees it, and wait for it to end."""
        self._wakeup.wake()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                return
        self._wakeup.close()

    def _set(self, state: str, message: str | None = None, info: TreeInfo | None = None) -> None:
        if info is not None:
            self.stats = DirectStats(state=state, path=info.path, files=info.files, bytes=info.bytes,
                                     assembled_bytes=info.assembled_bytes, message=message,
                                     opens_counted=self.opens.how)
        else:
            self.stats = DirectStats(state=state, message=message)

    def _on_fully_cached(self, full: bool) -> None:
        if full:
            self._fully_cached += 1
            self._wakeup.wake()

    def _should_build(self, last_attempt: int | None) -> int | None:
        """The reason to try a build now (also the key that stops retrying the same state)."""
        if self._warming() or not self._fully_cached or self._fully_cached == last_attempt:
            return None
        return self._fully_cached

    def _loop(self) -> None:
        trees, stop = self.trees, self._stop
        try:
            trees.recover()
            info = trees.load(trees.id)
            if info is not None:
                self._set("verifying", "checking the tree left by the last run against the cache")
                try:
                    trees.verify(info, stop)
                    self._ready(info)
                except TreeError as exc:
                    log.error("the direct tree %s cannot be reused: %s", info.path, exc)
                    self._set("failed", f"the tree of the last run cannot be reused: {exc}")
                    trees.discard_current()  # unless a mount still holds it; a later build replaces it
            self._old_trees = trees.old_trees()  # recover() removed what it could
            while not stop.is_set():
                self._step()
                self._wakeup.watch_mounts(self.bound or bool(self._old_trees))
                told = self._wakeup.watch_removals(trees.refs_dir(t) for t in self._old_trees)
                if self._wakeup.new_watch():
                    continue  # a reference or the bind may have gone before the watch was in place
                self._wakeup.wait(None if told else _OLD_TREE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - reported; the FUSE view keeps serving
            log.exception("direct tree management failed")
            self._set("failed", f"internal error: {exc}")

    def _step(self) -> None:
        """Whatever the events since the last step call for; each part is cheap when nothing is due."""
        trees, stop = self.trees, self._stop
        if self.bound:
            self._check_bind()
        if trees.current is None:
            key = self._should_build(self._last_attempt)
            if key is not None:
                self._last_attempt = key
                self._set("building")
                try:
                    self._ready(trees.build(stop))
                except TreeError as exc:
                    if stop.is_set():
                        return
                    log.warning("no direct tree: %s", exc)
                    self._set("failed", str(exc))
            elif self.stats.state == "waiting" and self.stats.message is None:
                self._set("waiting", "serving through FUSE until the whole dataset is cached")
        for rel in trees.pending_repairs():
            try:
                relinked = trees.repair(rel)
                if relinked is not None:
                    self.opens.learn(*relinked)
            except (OSError, TreeError) as exc:
                message = f"direct tree: cannot relink {rel}: {exc}"
                log.error(message)
                self._counters.add_error(message)
        if self._old_trees:
            trees.remove_unused()
            self._old_trees = trees.old_trees()

    def _ready(self, info: TreeInfo) -> None:
        """Publish a complete, verified tree: record it, and bind it over the mountpoint."""
        self.trees.current = info
        message = None
        # Watched before anything can open it through a bind: no open goes uncounted.
        self.opens.start(info.path, self.trees.files_of(info), self.trees.dirs_of_tree())
        if self._bind:
            try:
                bind_readonly(info.path, self._mountpoint, [])
                self.bound = True
            except OSError as exc:
                message = f"the tree is ready but could not be bound over {self._mountpoint}: {exc}"
                log.error(message)
        self._publish(info.path)
        # The mode first, "ready" last: whoever sees the tree ready sees it serving (a stats
        # copy taken between the two showed state ready with serving fuse, under load).
        if message is None and self._mode.allows(Event.TREE_BOUND):
            self._mode.apply(Event.TREE_BOUND)
        elif message is None:  # a second bind over our own: the mode is already direct
            log.warning("the direct tree was bound again over %s (serving mode %s)", self._mountpoint,
                        self._mode.mode.value)
        self._set("ready", message, info)
        log.info("serving %s from the direct tree %s", self._source, info.path)

    def _check_bind(self) -> None:
        """The tree's bind was taken off the mountpoint (``umount``, ``fusermount3 -u``): that
        asks for an unmount, so unmount the FUSE view underneath as well, and stop."""
        mountpoint = self._mountpoint
        if _top_is_tree_bind(mountpoint):
            return
        self.bound = False
        self._mode.apply(Event.TREE_UNBOUND)
        log.info("the direct tree's bind was removed from %s; unmounting the FUSE view too", mountpoint)
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)

    def unbind(self) -> None:
        """Remove the tree's bind (and, behind it, a FUSE view libfuse could not unmount)."""
        mountpoint = self._mountpoint
        clear_tree_binds(mountpoint)
        self.bound = False
        self._mode.apply(Event.TREE_UNBOUND)
        # libfuse unmounts the *top* mount at exit: if that was the tree's bind, the FUSE view
        # itself is still there, dead. It is ours; detach it.
        for entry in mounts_at(mountpoint):
            if entry.fstype == "fuse.datahoard" and entry.source == f"datahoard:{self._source}":
                try:
                    detach(mountpoint)
                except OSError as exc:
                    log.warning("cannot detach the FUSE view at %s: %s", mountpoint, exc)
                break


__all__ = ["DirectServing"]
