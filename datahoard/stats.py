"""The worker's stats document: what ``GET /stats`` returns.

The operator and ``datahoard status`` both read it, so this model is the contract between them
and the cache worker. Counters are cumulative over the life of the cache directory (a worker
saves them there and a restart continues them, see ``cache_worker/counters.py``); byte counters count
bytes handed to readers (``served_*``) or fetched from the source (``fetched_bytes``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class WarmingStats(BaseModel):
    state: str = Field(description="idle | running | done | failed")
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_per_second: float = 0.0
    message: str | None = Field(default=None, description="why warming stopped early or failed")

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


class RecentStats(BaseModel):
    """Bytes served over the last ``window_seconds`` (up to 10 minutes; less just after the
    first start), for a hit ratio that follows the current epoch instead of the lifetime."""

    window_seconds: float = 0.0
    served_from_cache_bytes: int = 0
    served_bytes: int = 0

    @property
    def hit_ratio(self) -> float | None:
        return self.served_from_cache_bytes / self.served_bytes if self.served_bytes else None


class DirectStats(BaseModel):
    """The direct tree: the fully cached dataset as plain files, served with no FUSE hop."""

    state: str = Field(default="off", description="off | waiting | building | verifying | ready | failed")
    path: str | None = Field(default=None, description="the tree's directory, once ready")
    files: int = 0
    bytes: int = Field(default=0, description="bytes of the dataset in the tree")
    assembled_bytes: int = Field(default=0, description="bytes of large files assembled from chunks (their own space)")
    message: str | None = Field(default=None, description="why there is no tree (yet), or what went wrong")
    opens_counted: str | None = Field(
        default=None, description="how opens of the tree are counted in the hit ratio (fanotify by file id), "
        "or why they are not")


class FuseStats(BaseModel):
    """How the view talks to the kernel: what reads cost, and what a worker restart costs readers."""

    passthrough: bool = Field(
        default=False,
        description="opens of files whole in the cache are answered with FUSE passthrough: the kernel reads "
        "the cache file itself, at local-disk speed, even while no worker runs")
    passthrough_note: str | None = Field(default=None, description="why passthrough is off, if it is")
    handover: bool = Field(
        default=False,
        description="a keeper holds the FUSE connection: a worker restart is a pause for readers, not an error")
    handover_note: str | None = Field(
        default=None, description="why restarts are not hidden (then the CSI plugin repairs binds after one)")
    resumed: bool = Field(default=False, description="this worker took over a connection another worker served")
    passthrough_opens: int = Field(default=0, description="opens answered with passthrough since start")
    native_opens: int = Field(
        default=0, description="of those, opens answered by the worker's native responder, without Python")
    native_lookups: int = Field(
        default=0, description="LOOKUPs answered again by the native responder, without Python")
    native_armed: int = Field(
        default=0, description="files whose opens (passthrough) or reads (kernel opens) the native "
        "responder answers now (armed)")
    native_reads: int = Field(
        default=0, description="with kernel opens, reads that missed the page cache answered by the native "
        "responder from the cache file, without Python")
    native_counted_opens: int = Field(
        default=0, description="with kernel opens, opens fanotify reported that the native responder counted "
        "(armed files), without Python per open")
    arming_ahead: bool = Field(
        default=False, description="the dataset is (about to be) fully cached and the worker is arming every "
        "file for the native responder; `--warm --wait` returns once it is done")
    native_note: str | None = Field(
        default=None, description="why opens to pass through are answered in Python, if they are")
    opens_counted_by: str = Field(
        default="", description="with kernel opens, how fanotify reports them: 'file ids' (one mark per "
        "directory, the cheaper) or 'descriptors' (past 65,536 directories, or a kernel before 6.8); "
        "empty without kernel opens")


class ConsumerStats(BaseModel):
    """Bytes one consumer read through the view: a pod (``namespace``/``pod``), the ``host``
    (a process in no pod), ``unattributed`` (the worker cannot see the reader's pid) or
    ``other`` (every consumer beyond the top 20, folded: see cache_worker/consumers.py)."""

    namespace: str = Field(default="", description="the pod's namespace; empty for host, unattributed, other")
    pod: str = Field(description="the pod's name (its UID when the CSI plugin did not record it)")
    served_from_cache_bytes: int = 0
    served_from_source_bytes: int = 0

    @property
    def served_bytes(self) -> int:
        return self.served_from_cache_bytes + self.served_from_source_bytes

    @property
    def hit_ratio(self) -> float | None:
        return self.served_from_cache_bytes / self.served_bytes if self.served_bytes else None


class RefreshStats(BaseModel):
    """The last in-place refresh of the view (cache_worker/refresh.py)."""

    state: str = Field(default="none", description="none | running | done | failed")
    snapshot: str | None = Field(default=None, description="the snapshot refreshed to (or asked for)")
    token: str | None = Field(default=None, description="the operator's request this refresh answered "
                              "(DATAHOARD_REFRESH_TOKEN), None for one asked on this machine")
    started_at: float | None = None
    finished_at: float | None = None
    message: str | None = Field(default=None, description="what changed, or why the refresh failed")
    added_files: int = 0
    changed_files: int = 0
    removed_files: int = 0
    added_bytes: int = 0


class WorkerStats(BaseModel):
    source: str
    mountpoint: str
    ready: bool
    files: int
    total_bytes: int
    cached_bytes: int = Field(description="bytes of the dataset present in the local cache")
    capacity_bytes: int
    served_from_cache_bytes: int
    served_from_source_bytes: int
    fetched_bytes: int = Field(description="bytes read from the source, warming included")
    hits: int = Field(description="reads answered from the cache (count)")
    misses: int = Field(description="reads that needed the source (count)")
    skipped_keys: int = Field(description="object keys that cannot be paths and were left out")
    snapshot: str | None = Field(
        default=None,
        description="id of the listing snapshot served (sha256 of its canonical form, cache_worker/snapshot.py): "
        "workers with equal ids serve the same file set; the worker serves it at GET /snapshot/<id>")
    errors: int
    last_error: str | None = None
    degraded: str | None = Field(default=None, description="why the cache is degraded, if it is")
    unverified_objects: int = Field(
        default=0,
        description="objects served and cached without a check the store vouches for (no MD5 ETag or "
        "checksum the worker can recompute, larger than half the cache, or no room to check them whole)",
    )
    integrity_mismatches: int = Field(
        default=0, description="fetches that did not match the store's checksum: dropped and fetched again")
    last_mismatch: str | None = None
    warming: WarmingStats
    serving: str = Field(
        default="fuse",
        description="fuse | direct. With direct, new opens are served by the kernel from the direct tree and "
        "never reach the worker; fanotify reports each, counted as a hit of the whole file "
        "(direct.opens_counted says how, or why not)",
    )
    kernel_opens: bool = Field(
        default=False,
        description="the dataset is cached and the kernel serves opens itself (no trip to the worker); "
        "fanotify counts them, so the served bytes and hit ratio stay as exact as before",
    )
    direct: DirectStats = Field(default_factory=DirectStats)
    refresh: RefreshStats = Field(default_factory=RefreshStats)
    recent: RecentStats = Field(default_factory=RecentStats)
    fuse: FuseStats = Field(default_factory=FuseStats)
    consumers: list[ConsumerStats] = Field(
        default_factory=list,
        description="served bytes per consumer over the cache directory's life: the top 20 by bytes, then 'other'")

    @property
    def served_bytes(self) -> int:
        return self.served_from_cache_bytes + self.served_from_source_bytes

    @property
    def hit_ratio(self) -> float:
        """Bytes served from cache / bytes served; 0 before anything was read."""
        served = self.served_bytes
        return self.served_from_cache_bytes / served if served else 0.0

    @property
    def cached_fraction(self) -> float:
        return self.cached_bytes / self.total_bytes if self.total_bytes else 1.0
