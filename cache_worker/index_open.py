"""The index a worker serves: reused, built from the snapshot asked for, or listed afresh.

Whatever its origin, the index is built from a snapshot file (snapshot.py) by the same code,
so two workers with the same snapshot id serve the same view. Step 2 of ``worker.run``."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

from . import snapshot
from .index import Index, IndexSummary, build_index_from, read_summary
from .keys import KeyFilter
from .settings import SourceSettings
from .source import Source
from .worker_config import Progress, WorkerConfig, WorkerError

log = logging.getLogger(__name__)


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


def open_index(cfg: WorkerConfig, source: Source, progress: Progress) -> Index:
    """The index to serve (raises WorkerError with what to fix)."""
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
    usable = (summary is not None and summary.source == cfg.source and summary.filter == wanted_filter
              and summary.snapshot is not None
              and (cfg.cache_dir / snapshot.file_name(summary.snapshot)).exists())
    if wanted:
        snapshot.check_id(wanted)
        if usable and summary.snapshot == wanted:
            log.info("reusing the index of snapshot %s (%d files)", wanted, summary.files)
        else:
            summary = _index_snapshot(cfg, wanted, peers, path, key_filter)
    elif usable and not cfg.refresh:
        log.info("reusing the index of snapshot %s (%d files, built at %s)", summary.snapshot,
                 summary.files, summary.built_at)
    else:
        reason = ("asked to" if cfg.refresh else "no index yet" if summary is None
                  else "the index predates snapshots" if summary.snapshot is None else "source changed")
        log.info("listing %s (%s)", cfg.source, reason)
        snap_id, _, listed = snapshot.write(source.list(), cfg.source, cfg.cache_dir,
                                            lambda n: progress("listed", n))
        log.info("listed %d objects: snapshot %s", listed, snap_id)
        summary = _build(cfg, snap_id, path, key_filter)
    snapshot.remove_others(cfg.cache_dir, summary.snapshot or "")
    if problem := empty_view_problem(cfg, summary):
        path.unlink(missing_ok=True)  # list again next time: the objects may be there by then
        raise WorkerError(problem)
    return Index(path)


def _index_snapshot(cfg: WorkerConfig, snap_id: str, peers: tuple[str, ...], path: Path,
                    key_filter: KeyFilter) -> IndexSummary:
    """Index snapshot ``snap_id``: from the cache directory if it is there, else a peer."""
    if not (cfg.cache_dir / snapshot.file_name(snap_id)).exists():
        if not peers:
            raise WorkerError(f"snapshot {snap_id} is not in {cfg.cache_dir} and no peer was given "
                              "to fetch it from (--snapshot-from URL)")
        log.info("fetching snapshot %s from %s", snap_id, ", ".join(peers))
        try:
            snapshot.fetch(peers, snap_id, cfg.cache_dir)
        except snapshot.SnapshotError as exc:
            raise WorkerError(str(exc)) from None
    return _build(cfg, snap_id, path, key_filter)


def _build(cfg: WorkerConfig, snap_id: str, path: Path, key_filter: KeyFilter) -> IndexSummary:
    file = cfg.cache_dir / snapshot.file_name(snap_id)
    try:
        summary = build_index_from(snapshot.read(file, snap_id, cfg.source), cfg.source, path,
                                   key_filter, snapshot=snap_id)
    except snapshot.SnapshotError as exc:
        file.unlink(missing_ok=True)
        raise WorkerError(str(exc)) from None
    log.info(
        "indexed %d files, %d bytes (%d keys skipped, %d hidden by directories) from snapshot %s",
        summary.files, summary.total_bytes, summary.skipped_keys, summary.shadowed_files, snap_id,
    )
    return summary


def snapshot_file(cfg: WorkerConfig, index: Index | None, snap_id: str) -> Path | None:
    """The file of the snapshot this worker serves, if ``snap_id`` names it."""
    current = index.summary.snapshot if index else None
    if current is None or snap_id != current:
        return None
    file = cfg.cache_dir / snapshot.file_name(current)
    return file if file.exists() else None


__all__ = ["open_index", "empty_view_problem", "snapshot_file"]
