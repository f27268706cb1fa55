"""NodeGetVolumeStats usage: the Dataset's numbers from its worker, else the filesystem's.

kubelet exports these as ``kubelet_volume_stats_*``. For a read-only dataset cache, free space
means nothing to the pod, so the worker's numbers are mapped to what an operator wants to see
on a dashboard:

* BYTES: total = dataset size, used = bytes already cached on this node, available = bytes
  still to be fetched. ``used / total`` is the node's cached fraction.
* INODES: total = used = number of files (a read-only view has no free inodes).

The worker is found through ``datahoard.runtime`` (the record a running mount leaves, keyed
by its mountpoint). When there is no record or the worker does not answer within a second,
the numbers come from ``statvfs`` of the published target, which the FUSE view answers too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from datahoard import runtime
from datahoard.stats import WorkerStats

from . import csi_pb2
from .mounter import bounded

log = logging.getLogger(__name__)

#: NodeGetVolumeStats runs on kubelet's periodic volume-stats loop: never wait long for a worker.
STATS_TIMEOUT = 1.0

StatsLookup = Callable[[str], "WorkerStats | None"]


def worker_stats(view_path: str) -> WorkerStats | None:
    """The stats of the worker serving *view_path*, or None when it cannot be reached."""
    # No pid check: in Kubernetes the worker runs in another pid namespace; a dead worker shows
    # up as a failed HTTP request instead.
    record = runtime.lookup(view_path, check_alive=False)
    if record is None:
        return None
    try:
        return runtime.fetch_stats(record.stats_url, timeout=STATS_TIMEOUT)
    except (OSError, ValueError) as exc:
        log.debug("no stats from worker at %s for %s: %s", record.stats_url, view_path, exc)
        return None


def from_worker(stats: WorkerStats) -> list[csi_pb2.VolumeUsage]:
    total = max(stats.total_bytes, 0)
    used = min(max(stats.cached_bytes, 0), total)
    return [
        csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=total, used=used, available=total - used),
        csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.INODES, total=stats.files, used=stats.files, available=0),
    ]


def from_statvfs(vfs: os.statvfs_result) -> list[csi_pb2.VolumeUsage]:
    block = vfs.f_frsize or vfs.f_bsize
    total, free = vfs.f_blocks * block, vfs.f_bavail * block
    usage = [
        csi_pb2.VolumeUsage(
            unit=csi_pb2.VolumeUsage.BYTES, total=total, available=free, used=max(total - vfs.f_bfree * block, 0)
        )
    ]
    if vfs.f_files:
        usage.append(
            csi_pb2.VolumeUsage(
                unit=csi_pb2.VolumeUsage.INODES,
                total=vfs.f_files,
                available=vfs.f_favail,
                used=max(vfs.f_files - vfs.f_ffree, 0),
            )
        )
    return usage


def volume_usage(
    view_path: str, target_vfs: os.statvfs_result | None, lookup: StatsLookup = worker_stats
) -> list[csi_pb2.VolumeUsage]:
    """Usage for a target whose probe answered (*target_vfs*); nothing for one that did not.

    The lookup runs bounded: finding the worker's record resolves the view's path, which a
    FUSE view that stops answering would block.
    """
    if target_vfs is None:
        return []
    stats = bounded(lambda: lookup(view_path), STATS_TIMEOUT * 2, f"stats {view_path}")
    if stats is not None:
        return from_worker(stats)
    return from_statvfs(target_vfs)
