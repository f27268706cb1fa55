"""The worker's stats copy: one consistent ``WorkerStats`` from the worker's parts, for the
stats endpoint (stats_server.py), ``datahoard status`` and the operator.

Only copies: the counts' rules live in counters.py (see its docstring), the serving mode in
serving.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datahoard.stats import ConsumerStats, FuseStats, RecentStats, RefreshStats, WarmingStats, WorkerStats

from .counters import Counters

if TYPE_CHECKING:
    from .index import Index
    from .store import ChunkStore
    from .worker import Worker


def worker_stats(w: Worker) -> WorkerStats:
    if w.view is not None:
        w.view.drain_opens()  # opens the kernel made (fanotify) are counted before the copy
    if w.direct is not None:
        w.direct.opens.drain()  # and those of the direct tree
    c = w.counters
    store, index = w.store, w.index
    with c.lock:
        s = c.warm
        warming = WarmingStats(
            state=s.state,
            files_total=s.files_total,
            files_done=s.files_done,
            bytes_total=s.bytes_total,
            bytes_done=s.bytes_done,
            bytes_per_second=s.rate(),
            message=s.message,
        )
        counts = dict(
            served_from_cache_bytes=c.served_from_cache,
            served_from_source_bytes=c.served_from_source,
            fetched_bytes=c.fetched,
            hits=c.hits,
            misses=c.misses,
            errors=c.errors,
            last_error=c.last_error,
            degraded=c.degraded or (store.problem if store else None),
            unverified_objects=c.unverified_objects,
            integrity_mismatches=c.integrity_mismatches,
            last_mismatch=c.last_mismatch,
        )
        window, recent_cache, recent_served = c.recent()
    recent = RecentStats(window_seconds=window, served_from_cache_bytes=recent_cache,
                         served_bytes=recent_served)
    mode = w.mode.mode
    return WorkerStats(
        source=w.config.source,
        mountpoint=str(w.config.mountpoint),
        ready=w.healthy(),
        files=index.files if index else 0,
        total_bytes=index.total_bytes if index else 0,
        cached_bytes=_cached_bytes(w, index, store),
        capacity_bytes=store.capacity if store else 0,
        skipped_keys=index.summary.skipped_keys if index else 0,
        snapshot=index.summary.snapshot if index else None,
        warming=warming,
        serving=mode.serving,
        kernel_opens=mode.kernel_opens,
        direct=w.direct_stats(),
        refresh=w.refresher.state if w.refresher is not None else RefreshStats(),
        recent=recent,
        fuse=_fuse_stats(w),
        consumers=_consumer_stats(c),
        **counts,
    )


def _cached_bytes(w: Worker, index: Index | None, store: ChunkStore | None) -> int:
    """Bytes of the current snapshot in the cache, as far as the store's count tells. The store
    also holds objects of an earlier snapshot that a refresh replaced or removed (kept for
    descriptors opened before it, until they are evicted), so its bytes can pass the
    dataset's: after a refresh that replaced a third of a dataset, ``datahoard status`` said
    "158.6%" cached. Past the dataset's size: the dataset's size once it is fully cached ("fully
    cached" event, completeness.py), else one byte less. Up to it, the store's bytes, exact
    unless such old objects are among them (telling them apart takes a walk of the index)."""
    if store is None:
        return 0
    used = store.used_bytes
    if index is None or used <= index.total_bytes:
        return used
    if w.completeness is not None and w.completeness.full:
        return index.total_bytes
    return max(index.total_bytes - 1, 0)


def _consumer_stats(counters: Counters) -> list[ConsumerStats]:
    table = counters.consumers
    return [ConsumerStats(namespace=c.namespace, pod=c.pod, served_from_cache_bytes=c.from_cache,
                          served_from_source_bytes=c.from_source)
            for c in (table.snapshot() if table is not None else [])]


def _fuse_stats(w: Worker) -> FuseStats:
    att, view, cfg = w.attachment, w.view, w.config
    state = att.conn.state if att is not None else None
    passthrough = bool(view is not None and view.backing is not None and state is not None and state.passthrough)
    if cfg.passthrough == "off":
        why = "off (--no-passthrough)"
    elif cfg.passthrough == "auto" and not w.large_files and not w.beyond_memory:
        why = ("every file fits in one chunk and the dataset in half the node's memory: served from the page "
               "cache, and once all are cached the kernel opens them itself (faster while the page cache holds "
               "them; --passthrough forces it)")
    elif state is not None and not state.passthrough:
        why = "the kernel does not offer FUSE passthrough (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
    else:
        why = None
    if w.mode.mode.kernel_opens:
        why = "the kernel opens files itself (a fully cached dataset of small files): no opens to pass through"
        passthrough = False
    native = view.native.stats() if view is not None and view.native is not None else {}
    return FuseStats(
        passthrough=passthrough,
        passthrough_note=None if passthrough else why,
        handover=bool(att is not None and att.handover),
        handover_note=None if att is None or att.handover else att.note,
        resumed=bool(att is not None and att.resumed),
        passthrough_opens=view.passthrough_opens if view is not None else 0,
        opens_counted_by=view.open_watch_mode if view is not None else "",
        native_opens=native.get("opens", 0),
        native_lookups=native.get("lookups", 0),
        native_armed=view.armed_count() if view is not None else 0,
        native_reads=native.get("reads", 0),
        native_counted_opens=native.get("kernel_opens_counted", 0),
        arming_ahead=bool(view is not None and view.native is not None and w.arm_ahead is not None
                          and (w.arm_ahead.pending or w.completeness.busy)),
        native_note=None if view is None or view.native is not None else view.native_note,
    )


__all__ = ["worker_stats"]
