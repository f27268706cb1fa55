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
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datahoard.stats import RefreshStats

from . import snapshot
from .index import Index
from .index_refresh import IndexDiff, build_continuing
from .keys import KeyFilter
from .source import SourceError
from .worker_config import WorkerError

log = logging.getLogger(__name__)

RETIRED_PREFIX = "index.db.retired-"


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
        if snapshot_id is None:
            log.info("refresh: listing %s", self._uri)
            snapshot_id, _, listed = snapshot.write(self._parts.list_source(), self._uri, self._dir)
            log.info("refresh: listed %d objects: snapshot %s", listed, snapshot_id)
        elif not (self._dir / snapshot.file_name(snapshot_id)).exists():
            if not peers:
                raise WorkerError(f"snapshot {snapshot_id} is not here and no peer was given to fetch it from")
            snapshot.fetch(peers, snapshot_id, self._dir)
        if snapshot_id == current:
            log.info("refresh: the source still lists snapshot %s; nothing to do", current)
            return IndexDiff(), snapshot_id
        path = self._dir / "index.db"
        building = self._dir / "index.db.next"
        objects = snapshot.read(self._dir / snapshot.file_name(snapshot_id), snapshot_id, self._uri)
        try:
            summary, diff = build_continuing(old, path, objects, self._uri, building, self._filter,
                                             snapshot=snapshot_id)
            if problem := self._problem(summary):
                raise WorkerError(f"the new listing is refused: {problem}")
        except BaseException:
            building.unlink(missing_ok=True)
            raise
        # The old index moves to a second name for the requests still reading it, then the new
        # one takes the name a restarted worker opens.
        _remove_retired(self._dir)  # the index before the last: nothing reads it any more
        retired = self._dir / f"{RETIRED_PREFIX}{current or 'unknown'}"
        os.link(path, retired)
        old.retire(retired)
        os.replace(building, path)
        new = Index(path)
        self._parts.take_index(new)
        self._parts.drop_names(diff.stale_names)
        snapshot.remove_others(self._dir, snapshot_id)
        log.info("refreshed to snapshot %s: %s", snapshot_id, diff.describe())
        return diff, snapshot_id


def _remove_retired(directory: Path) -> None:
    for path in directory.glob(RETIRED_PREFIX + "*"):
        path.unlink(missing_ok=True)


def cleanup(directory: Path) -> None:
    """At start-up: indexes retired by an earlier process's refreshes are read by nobody now."""
    _remove_retired(directory)
    for leftover in ("index.db.next", "index.db.previous"):
        (directory / leftover).unlink(missing_ok=True)


__all__ = ["Refresher", "RefreshRefused", "Parts", "cleanup"]
