"""Building the index a worker serves from a snapshot, and swapping it in under ``index.db``.

One path for every origin of a new index: a worker starting (index_open.py: reused, fetched
from a peer, listed afresh, or listed for the operator's refresh) and a refresh of a mounted
view (refresh.py). Whenever an index of the same source and filter is there, the new one keeps
its node ids (index_refresh.py), so moving to another snapshot needs no remount.

The swap: the new index is built at ``index.db.next``, checked, and renamed over ``index.db``;
the index it replaces gets a second name, ``index.db.previous`` (SQLite cannot reopen a file
by descriptor, see ``Index.retire``), for the view to answer the ids only it knows while the
kernel still holds them. One generation is kept: the view keeps one previous index
(``fs_ids.take_index``), and ids are never reused along a lineage, so an index opened under that
name a moment late answers the same objects or none, never others. A start-up removes both
names (``cleanup``): no process reads them then.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from . import snapshot
from .index import Index, IndexSummary, build_index_from
from .index_refresh import IndexDiff, build_continuing
from .keys import KeyFilter
from .worker_config import WorkerError

log = logging.getLogger(__name__)

INDEX = "index.db"
NEXT = "index.db.next"
PREVIOUS = "index.db.previous"

#: Why a new index must not replace the one served (None: it may), e.g. an empty listing.
Check = Callable[[IndexSummary], "str | None"]


class IndexBuilder:
    """Builds ``cache_dir/index.db`` for ``source_uri`` through ``key_filter``, keeping the ids
    of ``current`` (the index there now, if it is of the same source and filter; opened only when
    a build needs it, so a reused index costs nothing more at mount time)."""

    def __init__(self, cache_dir: Path, source_uri: str, key_filter: KeyFilter,
                 current: Index | Callable[[], Index] | None) -> None:
        self.cache_dir, self.source_uri, self.key_filter = cache_dir, source_uri, key_filter
        self.path = cache_dir / INDEX
        self._current = current
        #: The index a build replaced (now under ``index.db.previous``), or None.
        self.replaced: Index | None = None
        self.stale_names: list[tuple[int, str]] = []
        self.diff: IndexDiff | None = None
        #: The snapshot of the last index this builder put under ``index.db``.
        self.built: str | None = None

    @property
    def current(self) -> Index | None:
        if callable(self._current):
            self._current = self._current()
        return self._current

    def list(self, objects: Iterable, progress: Callable[[int], None] | None = None) -> str:
        """Write the listing ``objects`` as a snapshot file; its id."""
        snap_id, _, listed = snapshot.write(objects, self.source_uri, self.cache_dir, progress)
        log.info("listed %d objects: snapshot %s", listed, snap_id)
        return snap_id

    def fetch(self, snap_id: str, peers: tuple[str, ...]) -> None:
        """Make sure snapshot ``snap_id`` is in the cache directory, fetching it from a peer."""
        if (self.cache_dir / snapshot.file_name(snap_id)).exists():
            return
        if not peers:
            raise WorkerError(f"snapshot {snap_id} is not in {self.cache_dir} and no peer was given "
                              "to fetch it from (--snapshot-from URL)")
        log.info("fetching snapshot %s from %s", snap_id, ", ".join(peers))
        try:
            snapshot.fetch(peers, snap_id, self.cache_dir)
        except snapshot.SnapshotError as exc:
            raise WorkerError(str(exc)) from None

    def build(self, snap_id: str, check: Check | None = None) -> IndexSummary:
        """Index snapshot ``snap_id`` (in the cache directory) and put it under ``index.db``.
        ``check`` refuses it before the swap (WorkerError): the served index stays."""
        file = self.cache_dir / snapshot.file_name(snap_id)
        objects = snapshot.read(file, snap_id, self.source_uri)
        building = self.cache_dir / NEXT
        current = self.current
        try:
            if current is not None:
                summary, diff = build_continuing(current, self.path, objects, self.source_uri, building,
                                                 self.key_filter, snapshot=snap_id)
            else:
                summary, diff = build_index_from(objects, self.source_uri, building, self.key_filter,
                                                 snapshot=snap_id), None
            if check is not None and (problem := check(summary)):
                raise WorkerError(f"the new listing is refused: {problem}")
        except snapshot.SnapshotError as exc:
            file.unlink(missing_ok=True)
            building.unlink(missing_ok=True)
            raise WorkerError(str(exc)) from None
        except BaseException:
            building.unlink(missing_ok=True)
            raise
        if current is not None:
            self._retire(current)
        os.replace(building, self.path)
        self._current = lambda: Index(self.path)   # a further build continues from this one
        self.built, self.diff, self.stale_names = snap_id, diff, diff.stale_names if diff else []
        log.info(
            "indexed %d files, %d bytes (%d keys skipped, %d hidden by directories) from snapshot %s%s",
            summary.files, summary.total_bytes, summary.skipped_keys, summary.shadowed_files, snap_id,
            f" ({diff.describe()} since the last)" if diff else "",
        )
        return summary

    def _retire(self, current: Index) -> None:
        """Give the index being replaced its second name, atomically (the name never points at
        nothing while the view may open it), and point ``current``'s new connections there."""
        previous = self.cache_dir / PREVIOUS
        linking = previous.with_name(previous.name + ".tmp")
        linking.unlink(missing_ok=True)
        os.link(self.path, linking)
        os.replace(linking, previous)
        current.retire(previous)
        self.replaced = current


def cleanup(cache_dir: Path) -> None:
    """At start-up: a half-built or retired index is read by nobody now."""
    for name in (NEXT, PREVIOUS, PREVIOUS + ".tmp"):
        (cache_dir / name).unlink(missing_ok=True)


__all__ = ["IndexBuilder", "Check", "cleanup", "INDEX", "PREVIOUS"]
