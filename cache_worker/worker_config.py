"""What a worker is asked to do (``WorkerConfig``) and the error it reports when it cannot.

Kept apart from worker.py so the CLI, the entrypoint and the worker's parts (index_open.py,
direct_mode.py, worker_stats.py) share the settings without importing the lifecycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dataset_tuning import Tuning


class WorkerError(Exception):
    """A problem the user must fix before the mount can start; the message says how."""


@dataclass
class WorkerConfig:
    source: str
    mountpoint: Path
    cache_dir: Path
    capacity: int | None = None
    warm: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    endpoint_url: str | None = None
    region: str | None = None
    refresh: bool = False
    tuning: Tuning = field(default_factory=Tuning)
    stats_host: str = "127.0.0.1"
    stats_port: int = 0
    allow_other: bool = True
    log_file: str | None = None
    #: Serve the dataset from a direct tree once it is fully cached (see tree.py).
    direct: bool = False
    #: With ``direct``: stack the tree over the mountpoint. Off for Kubernetes workers, where
    #: the CSI node plugin binds the tree into new pods and pods published before stay on FUSE.
    direct_bind: bool = True
    #: Once a dataset of small files is fully cached, let the kernel serve opens (see
    #: ``DatasetFS.serve_opens_in_kernel``).
    kernel_opens: bool = True
    #: Answer opens of files whole in the cache with FUSE passthrough (kernel 6.9+): "on", "off",
    #: or "auto": for a dataset with a file larger than one chunk, or of more than half the
    #: node's memory. Measured (bench/ANALYSIS.md, 15,000 cached 110 KB files, x local disk):
    #: passthrough with the native responder 0.45 warm / 0.79 page cache dropped, the page cache
    #: with kernel opens 0.71 / 0.22 (the two cannot share a connection: answering an open ENOSYS
    #: gives passthrough up), so small files keep the page cache while it can hold them; for
    #: shards passthrough is 0.9-1.4 of local disk against 0.03 through the worker.
    passthrough: str = "auto"
    #: Keep the FUSE connection with the FUSE keeper, so a restart is a pause, not an error.
    handover: bool = True
    #: The keeper's socket (None: ``runtime.keeper_socket()``).
    keeper_socket: Path | None = None
    #: Pod name records of this dataset, written by the CSI node plugin (consumers.py).
    consumers_dir: Path | None = None
    #: Serve this snapshot (snapshot.py) instead of listing the source: reuse it if the cache
    #: directory holds it, else fetch it from ``snapshot_from`` (peers' stats URLs). None: the
    #: environment's ``DATAHOARD_SNAPSHOT_ID``/``DATAHOARD_SNAPSHOT_FROM``, else list.
    snapshot_id: str | None = None
    snapshot_from: tuple[str, ...] = ()


Progress = Callable[[str, int], None]


__all__ = ["WorkerConfig", "WorkerError", "Progress"]
