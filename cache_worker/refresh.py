"""Apply a new snapshot to a mounted view, without a remount (issue 15, part 2).

A growing dataset (new shards landing in the bucket) is refreshed in place: a new snapshot is
listed (or, given its id, fetched from a peer that listed it), indexed with the old index's ids
wherever nothing changed (index_refresh.py), and swapped into the view. What a reader sees:

* **Directory listings**: each one (``opendir`` to ``releasedir``) shows one snapshot, the one
  in force when it started (``DatasetFS.readdir`` builds a listing whole at offset 0); never a
  mix of old and new names.
* **Paths**: after the swap, every lookup answers from the new snapshot. The kernel's dentries
  of removed or replaced files (and removed directories) are invalidated
  (FUSE_NOTIFY_INVAL_ENTRY), so ``open`` of a removed path fails with ENOENT and of a
  replaced one opens the new object. Unchanged files keep their node ids, page cache and
  passthrough backing: a reader of them notices nothing.
* **Descriptors opened before the refresh** keep reading the object they opened, removed or
  replaced since (reads stay pinned to its listed version; in a bucket without versioning the
  store refuses a replaced object's bytes that are not cached yet: EIO, never the new bytes).
* Warming (if on) goes on over the new snapshot's files; "fully cached" is decided again.

Refusals, each with the reason in the result (the old snapshot keeps being served): a worker
serving the direct tree (a fixed copy of one snapshot), a listing that fails or is empty under
a prefix, a refresh already running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datahoard.stats import RefreshStats

from . import snapshot
from .index import Index
from .index_build import IndexBuilder
from .index_refresh import IndexDiff
from .keys import KeyFilter
from .source import SourceError
from .worker_config import WorkerError

log = logging.getLogger(__name__)


class RefreshRefused(Exception):
    """A refresh cannot start; the message says why (nothing changed)."""


@dataclass
class Parts:
    """What a refresh touches in the running worker (``WorkerRefresh._start_refresher``)."""

    index: Callable[[], Index]
    take_index: Callable[[Index], None]
    #: Make the kernel forget names that lead elsewhere now: [(parent node id, name)].
    drop_names: Callable[[list[tuple[int, str]]], None]
    list_source: Callable[[], object]  # an iterable of RemoteObject
    direct: bool


class Refresher:
    """One refresh at a time, in its own thread; its state is what ``/stats`` shows."""

    def __init__(self, cache_dir: Path, source_uri: str, key_filter: KeyFilter, parts: Parts,
                 source_path_problem: Callable[[object], str | None], last: RefreshStats | None = None) -> None:
        self._dir = cache_dir
        self._uri = source_uri
        self._filter = key_filter
        self._parts = parts
        self._problem = source_path_problem
        self._lock = threading.Lock()
        #: The last refresh: one made at start-up for the operator (index_open.py), until the next.
        self.state = last or RefreshStats()

    def start(self, snapshot_id: str | None = None, peers: tuple[str, ...] = ()) -> threading.Thread:
        """Begin a refresh in the background; raises RefreshRefused if one is running or the
        worker cannot take one."""
        if self._parts.direct:
            raise RefreshRefused("this worker serves the direct tree (--direct), a fixed copy of one snapshot: "
                                 "remount without --direct to refresh in place")
        if snapshot_id is not None:
            try:
                snapshot.check_id(snapshot_id)
            except snapshot.SnapshotError as exc:
                raise RefreshRefused(str(exc)) from None
        if not self._lock.acquire(blocking=False):
            raise RefreshRefused("a refresh is already running")
        self.state = RefreshStats(state="running", started_at=time.time(), snapshot=snapshot_id)
        thread = threading.Thread(target=self._run, args=(snapshot_id, peers), name="refresh", daemon=True)
        thread.start()
        return thread

    def _run(self, snapshot_id: str | None, peers: tuple[str, ...]) -> None:
        try:
            diff, snap = self._apply(snapshot_id, peers)
        except (WorkerError, SourceError, snapshot.SnapshotError, OSError) as exc:
            log.error("refresh failed, still serving the previous snapshot: %s", exc)
            self.state = self.state.model_copy(update={"state": "failed", "message": str(exc),
                                                       "finished_at": time.time()})
        except Exception as exc:  # noqa: BLE001 - reported; the old snapshot keeps serving
            log.exception("refresh failed")
            self.state = self.state.model_copy(update={"state": "failed", "message": repr(exc),
                                                       "finished_at": time.time()})
        else:
            self.state = diff.done(snap, self.state.started_at)
        finally:
            self._lock.release()

    def _apply(self, snapshot_id: str | None, peers: tuple[str, ...]) -> tuple[IndexDiff, str]:
        old = self._parts.index()
        current = old.summary.snapshot
        build = IndexBuilder(self._dir, self._uri, self._filter, old)
        if snapshot_id is None:
            log.info("refresh: listing %s", self._uri)
            snapshot_id = build.list(self._parts.list_source())
        else:
            build.fetch(snapshot_id, peers)
        if snapshot_id == current:
            log.info("refresh: the source still lists snapshot %s; nothing to do", current)
            return IndexDiff(), snapshot_id
        build.build(snapshot_id, check=self._problem)
        self._parts.take_index(Index(build.path))
        self._parts.drop_names(build.stale_names)
        snapshot.remove_others(self._dir, snapshot_id)
        diff = build.diff or IndexDiff()
        log.info("refreshed to snapshot %s: %s", snapshot_id, diff.describe())
        return diff, snapshot_id


__all__ = ["Refresher", "RefreshRefused", "Parts"]
