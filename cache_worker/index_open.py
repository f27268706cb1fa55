"""The index a worker serves: reused, built from the snapshot asked for, or listed afresh.

Whatever its origin, the index is built from a snapshot file (snapshot.py) by the same code,
so two workers with the same snapshot id serve the same view. Step 2 of ``worker.run``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import snapshot
from datahoard.stats import RefreshStats

from .index import Index, IndexSummary, read_summary
from .index_build import INDEX, IndexBuilder
from .index_refresh import IndexDiff
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
    ids (index_build.py): moving to another snapshot then needs no remount, and a worker that
    restarts onto it resumes the connection the kernel holds."""
    path = cfg.cache_dir / INDEX
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
    usable = summary if (same_line and summary.snapshot is not None
                         and (cfg.cache_dir / snapshot.file_name(summary.snapshot)).exists()) else None
    build = IndexBuilder(cfg.cache_dir, cfg.source, key_filter, (lambda: Index(path)) if same_line else None)
    token, refresh = _asked_to_list(cfg, env)
    if token:
        refresh = _list_for_the_operator(cfg, build, source, token, progress)
    holds = build.built or (summary.snapshot if same_line else None)   # the snapshot index.db holds now
    if refresh is None or refresh.state != "done" or refresh.snapshot != holds:
        _usual(cfg, build, summary, usable, wanted, peers, source, progress)
    index = Index(path)
    snapshot.remove_others(cfg.cache_dir, index.summary.snapshot or "")
    if problem := empty_view_problem(cfg, index.summary):
        path.unlink(missing_ok=True)  # list again next time: the objects may be there by then
        raise WorkerError(problem)
    return OpenedIndex(index, build.stale_names, refresh, build.replaced if build.stale_names else None)


def _usual(cfg: WorkerConfig, build: IndexBuilder, summary: IndexSummary | None, usable: IndexSummary | None,
           wanted: str | None, peers: tuple[str, ...], source: Source, progress: Progress) -> None:
    """Serve ``wanted``, else reuse a usable index, else list."""
    if wanted:
        snapshot.check_id(wanted)
        if usable and usable.snapshot == wanted:
            log.info("reusing the index of snapshot %s (%d files)", wanted, usable.files)
        else:
            build.fetch(wanted, peers)
            build.build(wanted)
    elif usable and not cfg.refresh:
        log.info("reusing the index of snapshot %s (%d files, built at %s)", usable.snapshot,
                 usable.files, usable.built_at)
    else:
        reason = ("asked to" if cfg.refresh else "no index yet" if summary is None
                  else "the index predates snapshots" if summary.snapshot is None else "source changed")
        log.info("listing %s (%s)", cfg.source, reason)
        build.build(build.list(source.list(), lambda n: progress("listed", n)))


def _list_for_the_operator(cfg: WorkerConfig, build: IndexBuilder, source: Source, token: str,
                           progress: Progress) -> RefreshStats:
    """List afresh for the operator's refresh ``token``; a failure (or a listing refused as
    empty) is reported and the index there stays (the worker then serves what it would have
    served without the request), never fatal."""
    started = time.time()
    try:
        snap_id = build.list(source.list(), lambda n: progress("listed", n))
        build.build(snap_id, check=lambda summary: empty_view_problem(cfg, summary))
    except (WorkerError, SourceError, snapshot.SnapshotError, OSError) as exc:
        log.error("the refresh the operator asked for failed, serving the previous snapshot: %s", exc)
        result = RefreshStats(state="failed", token=token, started_at=started, finished_at=time.time(),
                              message=str(exc))
    else:
        result = (build.diff or IndexDiff()).done(snap_id, started, token)
    try:  # the answer stays in stats across restarts, until the operator asks again
        (cfg.cache_dir / TOKEN_FILE).write_text(result.model_dump_json())
    except OSError as exc:
        log.warning("cannot remember the answer to refresh %s: %s", token, exc)
    return result


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


def snapshot_file(cfg: WorkerConfig, index: Index | None, snap_id: str) -> Path | None:
    """The file of the snapshot this worker serves, if ``snap_id`` names it."""
    current = index.summary.snapshot if index else None
    if current is None or snap_id != current:
        return None
    file = cfg.cache_dir / snapshot.file_name(current)
    return file if file.exists() else None


__all__ = ["open_index", "OpenedIndex", "empty_view_problem", "snapshot_file", "TOKEN_FILE"]
