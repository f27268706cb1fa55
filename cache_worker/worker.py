"""One mount of one dataset: wire source, index, store, cache, warmer, stats and FUSE together.

``run`` is what ``datahoard mount --foreground`` and the Kubernetes worker pod execute. The
order matters:

1. take the cache directory's lock (two workers on one cache would corrupt each other);
2. reuse the index, or list the source into a new one (``--refresh``, or the source changed);
3. open the chunk store (dropping leftovers of a crash);
4. start the stats endpoint, then the FUSE view; once libfuse reports the mount live, record
   the mount, start warming and tell the caller it is ready;
5. on unmount or SIGTERM: stop warming, flush the store, remove the record.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datahoard import runtime
from datahoard.stats import WarmingStats, WorkerStats

from .counters import Counters
from .dataset import DatasetCache, Tuning
from .fuse_view import DatasetView, mount_options
from .index import Index, build_index, read_summary
from .keys import KeyFilter
from .source import Source, SourceError
from .sources import open_source
from .stats_server import StatsServer
from .store import ChunkStore
from .warm import Warmer

log = logging.getLogger(__name__)

#: How long a new worker waits for the previous owner of its cache directory to exit.
_LOCK_WAIT_SECONDS = 10.0


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


Progress = Callable[[str, int], None]


def _prepare_mountpoint(mountpoint: Path) -> None:
    """Create the mountpoint, clearing a dead FUSE mount left by a crashed worker."""
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        os.listdir(mountpoint)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):  # the last worker died mounted
            log.warning("clearing the dead mount at %s", mountpoint)
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        else:
            raise WorkerError(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from exc
    if os.path.ismount(mountpoint):
        raise WorkerError(f"{mountpoint} is already a mount point; unmount it first")


def _default_capacity(cache_dir: Path, used: int) -> int:
    """90% of what the cache could grow into on its filesystem."""
    return int((shutil.disk_usage(cache_dir).free + used) * 0.9)


class Worker:
    def __init__(self, config: WorkerConfig, progress: Progress | None = None) -> None:
        self.config = config
        self._progress = progress or (lambda what, n: None)
        self.counters = Counters()
        self.ready = threading.Event()
        self._lock_fd: int | None = None
        self.source: Source | None = None
        self.index: Index | None = None
        self.store: ChunkStore | None = None
        self.cache: DatasetCache | None = None
        self.warmer: Warmer | None = None
        self.stats: StatsServer | None = None

    # -- steps -----------------------------------------------------------------------------
    def _lock_cache_dir(self) -> None:
        cfg = self.config
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cfg.cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        # A worker that was just unmounted may still be shutting down: give it a moment.
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise WorkerError(
                        f"cache directory {cfg.cache_dir} is in use by another datahoard mount"
                    ) from None
                time.sleep(0.1)
        self._lock_fd = fd

    def _open_index(self) -> Index:
        cfg = self.config
        path = cfg.cache_dir / "index.db"
        key_filter = KeyFilter(tuple(cfg.include), tuple(cfg.exclude))
        summary = read_summary(path)
        wanted_filter = {"include": list(key_filter.include), "exclude": list(key_filter.exclude)}
        if cfg.refresh or summary is None or summary.source != cfg.source or summary.filter != wanted_filter:
            reason = "asked to" if cfg.refresh else "no index yet" if summary is None else "source changed"
            log.info("listing %s (%s)", cfg.source, reason)
            summary = build_index(self.source, path, key_filter, lambda n: self._progress("listed", n))
            log.info(
                "indexed %d files, %d bytes (%d keys skipped, %d hidden by directories)",
                summary.files, summary.total_bytes, summary.skipped_keys, summary.shadowed_files,
            )
        else:
            log.info("reusing the index of %d files built at %s", summary.files, summary.built_at)
        return Index(path)

    def prepare(self) -> None:
        """Everything before the FUSE mount; raises WorkerError / SourceError with a clear message."""
        cfg = self.config
        _prepare_mountpoint(cfg.mountpoint)
        self._lock_cache_dir()
        self.source = open_source(cfg.source, cfg.endpoint_url, cfg.region)
        self.index = self._open_index()
        self.store = ChunkStore(cfg.cache_dir / "chunks", capacity=1 << 62)
        self.store.capacity = cfg.capacity or _default_capacity(cfg.cache_dir, self.store.used_bytes)
        self.cache = DatasetCache(self.source, self.store, self.counters, cfg.tuning)
        self.stats = StatsServer((cfg.stats_host, cfg.stats_port), self.snapshot, self.healthy)
        self.stats.start()

    def _on_mounted(self) -> None:
        cfg = self.config
        runtime.register(
            runtime.MountRecord(
                mountpoint=str(cfg.mountpoint.resolve()),
                pid=os.getpid(),
                stats_url=self.stats.url,
                source=cfg.source,
                cache_dir=str(cfg.cache_dir),
                log_file=cfg.log_file,
            )
        )
        if cfg.warm:
            self.warmer = Warmer(self.index, self.cache, self.counters, cfg.tuning.warm_parallelism)
            self.warmer.start()
        self.ready.set()
        log.info("serving %s at %s (stats %s)", cfg.source, cfg.mountpoint, self.stats.url)

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Mount and serve until unmounted or signalled."""
        from .fusebind import FUSE

        def mounted() -> None:
            self._on_mounted()
            if on_ready:
                on_ready()

        view = DatasetView(self.index, self.cache, self.counters, str(self.config.mountpoint), on_ready=mounted)
        options = mount_options(f"datahoard:{self.config.source}", allow_other=self.config.allow_other)
        try:
            FUSE(view, str(self.config.mountpoint), foreground=True, raw_fi=True, **options)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("shutting down")
        self.ready.clear()
        if self.warmer:
            self.warmer.stop()
        if self.cache:
            self.cache.close()
        if self.store:
            self.store.close()
            self.store = None
        if self.stats:
            self.stats.stop()
            self.stats = None
        runtime.unregister(self.config.mountpoint.resolve(), pid=os.getpid())
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    # -- reporting -------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.ready.is_set() and os.path.ismount(self.config.mountpoint)

    def snapshot(self) -> WorkerStats:
        c = self.counters
        with c.lock:
            w = c.warm
            warming = WarmingStats(
                state=w.state,
                files_total=w.files_total,
                files_done=w.files_done,
                bytes_total=w.bytes_total,
                bytes_done=w.bytes_done,
                bytes_per_second=w.rate(),
                message=w.message,
            )
            counts = dict(
                served_from_cache_bytes=c.served_from_cache,
                served_from_source_bytes=c.served_from_source,
                fetched_bytes=c.fetched,
                hits=c.hits,
                misses=c.misses,
                errors=c.errors,
                last_error=c.last_error,
                degraded=c.degraded,
            )
        store = self.store
        return WorkerStats(
            source=self.config.source,
            mountpoint=str(self.config.mountpoint),
            ready=self.healthy(),
            files=self.index.files if self.index else 0,
            total_bytes=self.index.total_bytes if self.index else 0,
            cached_bytes=store.used_bytes if store else 0,
            capacity_bytes=store.capacity if store else 0,
            skipped_keys=self.index.summary.skipped_keys if self.index else 0,
            warming=warming,
            **counts,
        )


def run(config: WorkerConfig, progress: Progress | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """Prepare and serve; raises WorkerError or SourceError before mounting if it cannot start."""
    worker = Worker(config, progress)
    try:
        worker.prepare()
    except BaseException:
        worker.shutdown()
        raise
    worker.serve(on_ready)


__all__ = ["run", "Worker", "WorkerConfig", "WorkerError", "SourceError"]
