"""The index a worker serves: reused, built from the snapshot asked for, or listed afresh.

Whatever its origin, the index is built from a snapshot file (snapshot.py) by the same code,
so two workers with the same snapshot id serve the same view. Step 2 of ``worker.run``."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import snapshot
from datahoard.stats import RefreshStats

from .index import Index, IndexSummary, build_index_from, read_summary
from .index_refresh import IndexDiff, build_continuing
from .keys import KeyFilter
from .settings import SourceSettings
from .source import Source, SourceError
from .worker_config import Progress, WorkerConfig, WorkerError

log = logging.getLogger(__name__)

#: In the cache directory: this node's answer to the operator's last refresh (RefreshStats).
TOKEN_FILE = "refresh-token"


def empty_view_problem(cfg: WorkerConfig, summary: IndexSummary) -> str | None:
    """Why an empty view must not be mounted, if it is empty and must not be.

    A path that names nothing is an error (a typo in a prefix, the wrong bucket): S3 has no
    directories, so for a prefix that is a listing with no files. A whole bucket (or HDFS's
    root) that is empty is served empty: the bucket exists and is what was asked for.
    """
    if summary.files or not urlsplit(cfg.source).path.strip("/"):
        return None
    why = f"nothing to serve: no files under {cfg.source}"
    if cfg.include or cfg.exclude:
        why += " match --include/--exclude"
    if summary.skipped_keys:
        why += f" ({summary.skipped_keys} keys there are not valid paths)"
    return why + "; check the path (it is listed again at the next mount)"


@dataclass
class OpenedIndex:
    """What step 2 of ``worker.run`` found or built."""

    index: Index
    #: Names that lead elsewhere than in the index this cache held before (index_refresh.py):
    #: a worker that resumes a connection must drop them from the kernel's cache.
    stale_names: list[tuple[int, str]] = field(default_factory=list)
    #: The operator's refresh this start answered (this node was its lister), or None.
    refresh: RefreshStats | None = None
    #: The index this one replaced (kept at ``index.db.previous`` for this process): the view
    #: answers ids only it knows, for descriptors the kernel opened before the restart.
    previous: Index | None = None


def open_index(cfg: WorkerConfig, source: Source, progress: Progress) -> OpenedIndex:
    """The index to serve (raises WorkerError with what to fix).

    Whenever the cache holds an index of the same source and filter, a new one keeps its node
    ids (index_refresh.py): moving to another snapshot then needs no remount, and a worker that
    restarts onto it resumes the connection the kernel holds."""
    path = cfg.cache_dir / "index.db"
    key_filter = KeyFilter(tuple(cfg.include), tuple(cfg.exclude))
    summary = read_summary(path)
    wanted_filter = {"include": list(key_filter.include), "exclude": list(key_filter.exclude)}
    env = SourceSettings.from_env()
    wanted = cfg.snapshot_id or env.snapshot_id
    peers = cfg.snapshot_from or env.snapshot_from
    if wanted and cfg.refresh:
        raise WorkerError("--refresh lists the source again, --snapshot-id serves a given snapshot: "
                          "ask for one or the other")
    same_line = summary is not None and summary.source == cfg.source and summary.filter == wanted_filter
    usable = (same_line and summary.snapshot is not None
              and (cfg.cache_dir / snapshot.file_name(summary.snapshot)).exists())
    build = _Builder(cfg, path, key_filter, summary if same_line else None)
    token, refresh = _asked_to_list(cfg, env)
    if token:
        refresh = build.list_for_the_operator(source, token, progress)
    if refresh is None or refresh.state != "done" or refresh.snapshot != build.snapshot:
        _usual(cfg, build, summary, usable, wanted, peers, source, progress)
    index = Index(path)
    snapshot.remove_others(cfg.cache_dir, index.summary.snapshot or "")
    if problem := empty_view_problem(cfg, index.summary):
        path.unlink(missing_ok=True)  # list again next time: the objects may be there by then
        raise WorkerError(problem)
    return OpenedIndex(index, build.stale_names, refresh, build.replaced if build.stale_names else None)


def _usual(cfg: WorkerConfig, build: "_Builder", summary: IndexSummary | None, usable: bool,
           wanted: str | None, peers: tuple[str, ...], source: Source, progress: Progress) -> None:
    """Serve ``wanted``, else reuse a usable index, else list."""
    usable = summary if usable else None
    if wanted:
        snapshot.check_id(wanted)
        if usable and usable.snapshot == wanted:
            log.info("reusing the index of snapshot %s (%d files)", wanted, usable.files)
        else:
            build.from_snapshot(wanted, peers)
    elif usable and not cfg.refresh:
        log.info("reusing the index of snapshot %s (%d files, built at %s)", usable.snapshot,
                 usable.files, usable.built_at)
    else:
        reason = ("asked to" if cfg.refresh else "no index yet" if summary is None
                  else "the index predates snapshots" if summary.snapshot is None else "source changed")
        log.info("listing %s (%s)", cfg.source, reason)
        build.listed(source, progress)


def _asked_to_list(cfg: WorkerConfig, env: SourceSettings) -> tuple[str | None, RefreshStats | None]:
    """(the operator's refresh token if this node must list the source for it, the answer this
    node gave to the current token before a restart). Each token is answered once."""
    token = env.refresh_token
    if not token or not env.refresh_lister or env.refresh_lister != env.node_name:
        return None, None
    try:
        answered = RefreshStats.model_validate_json((cfg.cache_dir / TOKEN_FILE).read_text())
    except (OSError, ValueError):
        return token, None
    return (None, answered) if answered.token == token else (token, None)


class _Builder:
    """Builds the index at ``path``, keeping the ids of the one there (``continued``: its summary,
    None if it is of another source or filter, or none is there)."""

    def __init__(self, cfg: WorkerConfig, path: Path, key_filter: KeyFilter, continued: IndexSummary | None) -> None:
        self.cfg, self.path, self.key_filter = cfg, path, key_filter
        self._continued = continued
        self._previous: Index | None = None
        self.stale_names: list[tuple[int, str]] = []
        self.diff: IndexDiff | None = None
        #: The snapshot the index at ``path`` holds now.
        self.snapshot = continued.snapshot if continued else None

    @property
    def previous(self) -> Index | None:
        """The index being replaced, opened only when a build needs it (a reused index costs
        nothing more at mount time)."""
        if self._previous is None and self._continued is not None:
            self._previous = Index(self.path)
        return self._previous

    def listed(self, source: Source, progress: Progress) -> str:
        snap_id, _, listed = snapshot.write(source.list(), self.cfg.source, self.cfg.cache_dir,
                                            lambda n: progress("listed", n))
        log.info("listed %d objects: snapshot %s", listed, snap_id)
        self.build(snap_id)
        return snap_id

    def from_snapshot(self, snap_id: str, peers: tuple[str, ...]) -> None:
        """Index snapshot ``snap_id``: from the cache directory if it is there, else a peer."""
        cfg = self.cfg
        if not (cfg.cache_dir / snapshot.file_name(snap_id)).exists():
            if not peers:
                raise WorkerError(f"snapshot {snap_id} is not in {cfg.cache_dir} and no peer was given "
                                  "to fetch it from (--snapshot-from URL)")
            log.info("fetching snapshot %s from %s", snap_id, ", ".join(peers))
            try:
                snapshot.fetch(peers, snap_id, cfg.cache_dir)
            except snapshot.SnapshotError as exc:
                raise WorkerError(str(exc)) from None
        self.build(snap_id)

    def list_for_the_operator(self, source: Source, token: str, progress: Progress) -> RefreshStats:
        """List afresh for the operator's refresh ``token``; a failure is reported (the worker
        then serves what it would have served without the request), never fatal."""
        started = time.time()
        try:
            snap_id = self.listed(source, progress)
            if problem := empty_view_problem(self.cfg, read_summary(self.path)):
                raise WorkerError(f"the new listing is refused: {problem}")
        except (WorkerError, SourceError, snapshot.SnapshotError, OSError) as exc:
            log.error("the refresh the operator asked for failed, serving the previous snapshot: %s", exc)
            if self._previous is not None:  # put the previous index back, if the build replaced it
                self._restore_previous()
            result = RefreshStats(state="failed", token=token, started_at=started, finished_at=time.time(),
                                  message=str(exc))
        else:
            result = (self.diff or IndexDiff()).done(snap_id, started, token)
        try:  # the answer stays in stats across restarts, until the operator asks again
            (self.cfg.cache_dir / TOKEN_FILE).write_text(result.model_dump_json())
        except OSError as exc:
            log.warning("cannot remember the answer to refresh %s: %s", token, exc)
        return result

    def build(self, snap_id: str) -> None:
        cfg = self.cfg
        file = cfg.cache_dir / snapshot.file_name(snap_id)
        objects = snapshot.read(file, snap_id, cfg.source)
        try:
            if self.previous is not None:
                summary, self.diff = build_continuing(self.previous, self.path, objects, cfg.source,
                                                      self._next, self.key_filter, snapshot=snap_id)
                self.stale_names = self.diff.stale_names
            else:
                summary = build_index_from(objects, cfg.source, self._next, self.key_filter, snapshot=snap_id)
        except snapshot.SnapshotError as exc:
            file.unlink(missing_ok=True)
            self._next.unlink(missing_ok=True)
            raise WorkerError(str(exc)) from None
        except BaseException:
            self._next.unlink(missing_ok=True)
            raise
        if self.previous is not None:
            self._keep_previous()
        os.replace(self._next, self.path)
        self.snapshot = snap_id
        log.info(
            "indexed %d files, %d bytes (%d keys skipped, %d hidden by directories) from snapshot %s%s",
            summary.files, summary.total_bytes, summary.skipped_keys, summary.shadowed_files, snap_id,
            f" ({self.diff.describe()} since the last)" if self.diff else "",
        )

    @property
    def replaced(self) -> Index | None:
        return self._previous

    @property
    def _next(self) -> Path:
        return self.path.with_name(self.path.name + ".next")

    @property
    def _kept(self) -> Path:
        return self.path.with_name(self.path.name + ".previous")

    def _keep_previous(self) -> None:
        """Keep the index being replaced at a second name until the worker has started: a
        failed request of the operator's puts it back (``_restore_previous``)."""
        self._kept.unlink(missing_ok=True)
        os.link(self.path, self._kept)
        self.previous.retire(self._kept)

    def _restore_previous(self) -> None:
        if self._kept.exists():
            os.replace(self._kept, self.path)
            self.previous.retire(self.path)
            self.snapshot = self.previous.summary.snapshot
            self.stale_names, self.diff = [], None


def snapshot_file(cfg: WorkerConfig, index: Index | None, snap_id: str) -> Path | None:
    """The file of the snapshot this worker serves, if ``snap_id`` names it."""
    current = index.summary.snapshot if index else None
    if current is None or snap_id != current:
        return None
    file = cfg.cache_dir / snapshot.file_name(current)
    return file if file.exists() else None


__all__ = ["open_index", "OpenedIndex", "empty_view_problem", "snapshot_file", "TOKEN_FILE"]
