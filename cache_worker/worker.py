"""One mount of one dataset: wire source, index, store, cache, warmer, stats and FUSE together.

``run`` is what ``datahoard mount --foreground`` and the Kubernetes worker pod execute. The
order matters:

1. take the cache directory's lock (two workers on one cache would corrupt each other);
2. reuse the index, or list the source into a new one (index_open.py);
3. open the chunk store (dropping leftovers of a crash);
4. start the stats endpoint (worker_stats.py makes the copy), then the FUSE view; once libfuse
   reports the mount live, record the mount, start warming and tell the caller it is ready;
5. on the "fully cached" event (completeness.py: the store reports each chunk cached or
   dropped, no poller walks the index), a dataset whose files are all at most one chunk hands
   opens to the kernel (``DatasetFS.serve_opens_in_kernel``): a warm epoch then costs this
   process nothing, and fanotify keeps the counts; with passthrough, every file is armed for
   the native responder ahead of its first open (arm_ahead.py);
6. with ``direct`` (direct_mode.py): once the dataset is fully cached (warming done, or found
   so at start-up), build the direct tree (``tree.py``), pin its chunks, and publish it: the
   mount record names it (the CSI node plugin binds it into new pods) and, with
   ``direct_bind``, a read-only bind of it is stacked over the mountpoint, so new opens bypass
   FUSE while descriptors already open on the FUSE view keep working;
7. on unmount or SIGTERM: hand the connection over to the keeper or unmount
   (``serving.stop_plan``), stop warming, remove the tree's bind, flush the store, remove the
   record.

Which of fuse, kernel opens and direct serves the mount is the state machine in serving.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from datahoard import runtime
from datahoard.mounts import mounts_at
from datahoard.stats import DirectStats, WorkerStats

from .arm_ahead import ArmAhead
from .attach import Attacher, Attachment, deposit, index_identity, keep_deposited, wait_until_live
from .cache_room import RoomWatch
from .claims import default_capacity, lock_cache_dir, prepare_mountpoint
from .completeness import Completeness
from .consumers import ConsumerTable, PodNames
from .counters import Counters
from .dataset import DatasetCache
from .direct_mode import DirectServing
from .fs import MAX_READ, RESERVE_THREADS, DatasetFS
from .fs_meta import METADATA_TIMEOUT
from .index import Index
from .index_open import OpenedIndex, open_index, snapshot_file
from .kernel_opens import KernelOpens
from .index_build import cleanup as cleanup_retired_indexes
from .serving import ServingMode, memory_limit, physical_memory, use_passthrough
from .source import Source, SourceError
from .sources import open_source
from .stats_server import StatsServer
from .store import ChunkStore
from .tree import DirectTrees
from .warm import Warmer
from .worker_config import Progress, WorkerConfig, WorkerError
from .worker_connection import WorkerConnection
from .worker_refresh import WorkerRefresh
from .worker_stats import worker_stats

log = logging.getLogger(__name__)


class Worker(WorkerConnection, WorkerRefresh):
    def __init__(self, config: WorkerConfig, progress: Progress | None = None) -> None:
        self.config = config
        self._progress = progress or (lambda what, n: None)
        self.counters = Counters()
        self.counters.consumers = ConsumerTable(names=PodNames(config.consumers_dir))
        self.ready = threading.Event()
        self._lock_fd: int | None = None
        self.source: Source | None = None
        self.index: Index | None = None
        #: What opening the index found (index_open.py).
        self.opened: OpenedIndex | None = None
        self.store: ChunkStore | None = None
        self.cache: DatasetCache | None = None
        self.warmer: Warmer | None = None
        self.stats: StatsServer | None = None
        self.trees: DirectTrees | None = None
        #: The direct tree's thread (direct_mode.py), with ``direct`` once prepared.
        self.direct: DirectServing | None = None
        #: fuse, kernel opens, direct (serving.py); moved by the events below, never polled.
        self.mode = ServingMode()
        #: The "fully cached" event (completeness.py).
        self.completeness: Completeness | None = None
        #: A file larger than one chunk, a dataset of more than half the node's memory (each
        #: decides passthrough "auto"; see ``_use_passthrough``).
        self.large_files = True
        self.beyond_memory = False
        self.view: DatasetFS | None = None
        self.arm_ahead: ArmAhead | None = None
        self.attacher: Attacher | None = None
        self.attachment: Attachment | None = None
        self.session = None
        self._handing_over = False
        self._stop = threading.Event()
        self._record: runtime.MountRecord | None = None
        #: In-place refreshes of the view (refresh.py), once it is mounted.
        self.refresher = None  # a Refresher once serving (worker_refresh.py)

    # -- steps -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything before the FUSE mount; raises WorkerError / SourceError with a clear message."""
        cfg = self.config
        # Claim a held connection before anything touches the mountpoint (attach.py).
        self.attacher = Attacher(cfg.mountpoint, cfg.handover, cfg.keeper_socket)
        if not self.attacher.resuming:
            prepare_mountpoint(cfg.mountpoint)
        self._lock_fd = lock_cache_dir(cfg.cache_dir, cfg.allow_other)
        self.counters.persist(cfg.cache_dir)  # continue the counts of the last run (counters.py)
        cleanup_retired_indexes(cfg.cache_dir)
        self.source = open_source(cfg.source, cfg.endpoint_url, cfg.region)
        self.opened = open_index(cfg, self.source, self._progress)
        self.index = self.opened.index
        self.store = ChunkStore(cfg.cache_dir / "chunks", capacity=1 << 62, private=not cfg.allow_other)
        self.store.capacity = cfg.capacity or default_capacity(cfg.cache_dir, self.store.used_bytes)
        self.cache = DatasetCache(self.source, self.store, self.counters, cfg.tuning)
        self.completeness = Completeness(self.index, self.cache)
        if cfg.direct:
            self.trees = DirectTrees(cfg.cache_dir, self.index, self.cache)
            self.direct = DirectServing(cfg.source, cfg.mountpoint, cfg.direct_bind, self.trees, self.store,
                                        self.completeness, self.counters, self.mode, self._stop,
                                        warming=self._warming, publish=self._publish_tree)
        self.stats = StatsServer((cfg.stats_host, cfg.stats_port), self.snapshot, self.healthy,
                                 snapshot_file=self.snapshot_file, refresh=self.ask_refresh)
        self.stats.start()

    def _on_mounted(self) -> None:
        cfg = self.config
        self._record = runtime.MountRecord(
            mountpoint=runtime.canonical_mountpoint(cfg.mountpoint),
            pid=os.getpid(),
            stats_url=self.stats.url,
            source=cfg.source,
            cache_dir=str(cfg.cache_dir),
            log_file=cfg.log_file,
        )
        runtime.register(self._record)
        self._plan_kernel_opens()
        self.arm_ahead = ArmAhead(self.view, self._stop)
        self.arm_ahead.plan(self.completeness)
        self.completeness.start()
        if cfg.warm:
            self._start_warming()
        if self.direct is not None:
            self.direct.start()
        RoomWatch(self.cache, self._stop, self._warm_again).start()
        self._start_refresher()
        self.ready.set()
        log.info("serving %s at %s (stats %s)", cfg.source, cfg.mountpoint, self.stats.url)

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Mount (or resume) and serve until unmounted or signalled.

        SIGTERM and SIGINT stop the session. With a keeper holding the connection that is a
        handover: requests in flight are answered and the mount stays for the next worker.
        Without one the view is unmounted, as a stop always did.
        """
        from .fusell.handshake import Wants
        from .fusell.passthrough import BackingTable
        from .fusell.passthrough_native import arms_for
        from .fusell.session import Session

        cfg = self.config
        identity = index_identity(self.index.summary)
        att = self.attacher.resume(identity)
        backing_log = cfg.cache_dir / "fuse-backing.log"
        if att is None:
            backing_log.unlink(missing_ok=True)  # it belonged to a connection that is gone
            att = self.attacher.mount(f"datahoard:{cfg.source}", cfg.allow_other)
        self.attachment = att
        arms = arms_for(physical_memory(), memory_limit())
        backing = BackingTable(backing_log, att.conn, arms=arms) if self._use_passthrough() else None
        view = self.view = DatasetFS(self.index, self.cache, self.counters, str(cfg.mountpoint), backing=backing,
                                     previous=self.opened.previous, conn_fd=att.conn.fd, arms=arms)
        background = cfg.tuning.max_waiting_reads + RESERVE_THREADS
        want = Wants(max_read=MAX_READ, max_background=background, congestion_threshold=background * 3 // 4,
                     passthrough=cfg.passthrough != "off", entry_timeout=METADATA_TIMEOUT, attr_timeout=METADATA_TIMEOUT)
        session = self.session = Session(att.conn, view, threads=background, want=want, native=view.native)

        def mounted() -> None:
            if not wait_until_live(session, cfg.mountpoint):
                return
            deposit(att, identity)
            if att.resumed:
                # Moved to another snapshot since the kernel's last look (index_open.py): the
                # names that lead elsewhere now, then what the last worker read but did not answer.
                self.drop_names(self.opened.stale_names)
                att.conn.notify_resend()
            if cfg.handover:
                threading.Thread(target=keep_deposited, args=(att, identity, cfg.keeper_socket, self._stop),
                                 name="keeper", daemon=True).start()
            self._on_mounted()
            if on_ready:
                on_ready()

        threading.Thread(target=mounted, name="ready", daemon=True).start()
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            how = session.serve()
            log.info("the FUSE session %s", "was handed over" if how == "stopped" else "ended")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()

    def _use_passthrough(self) -> bool:
        cfg = self.config
        self.large_files = self.index.max_file_size() > cfg.tuning.whole_file_max
        self.beyond_memory = self.index.summary.total_bytes > physical_memory() // 2
        return use_passthrough(cfg.passthrough, self.index.max_file_size(), cfg.tuning.whole_file_max,
                               self.index.summary.total_bytes, physical_memory())

    # -- events --------------------------------------------------------------------------
    def _plan_kernel_opens(self) -> None:
        att, cfg = self.attachment, self.config
        passthrough_live = bool(self.view.backing is not None and att is not None
                                and att.conn.state and att.conn.state.passthrough)
        KernelOpens(self.view, self.mode, self._stop).plan(
            self.completeness, cfg.kernel_opens, passthrough_live, self.index.max_file_size(),
            cfg.tuning.whole_file_max)

    def _warming(self) -> bool:
        return self.warmer is not None and self.counters.warm.state == "running"
    def _publish_tree(self, path: str) -> None:
        """Name the direct tree in the mount record (the CSI node plugin binds it into pods)."""
        if self._record is not None:
            self._record = runtime.MountRecord(**{**self._record.__dict__, "direct_tree": path})
            runtime.register(self._record)

    def _warm_again(self) -> None:
        """The cache disk has room again (cache_room.py): warm what could not be stored."""
        if self.config.warm and self.warmer is not None and self.counters.warm.state != "running":
            log.info("warming again: the cache disk has room for what it could not take before")
            self._start_warming()

    def _start_warming(self) -> None:
        """Warm the index served now, replacing a warmer of an earlier one."""
        if self.warmer is not None:
            self.warmer.stop()
        self.warmer = Warmer(self.index, self.cache, self.counters, self.config.tuning.warm_parallelism,
                             on_done=self.direct and self.direct.wake)  # a tree waits for warming
        self.warmer.start()

    def shutdown(self) -> None:
        log.info("shutting down")
        self.ready.clear()
        self._stop.set()
        if self.completeness is not None:
            self.completeness.stop()
        if self.direct is not None:
            self.direct.join(timeout=30)
            self.direct.opens.stop()  # counts what is queued, before the counters' last save
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
        if self.direct is not None and self._record is not None and not self._handing_over:
            self.direct.unbind()  # only what this worker mounted
        self._let_go_of_connection()
        runtime.unregister(runtime.canonical_mountpoint(self.config.mountpoint), pid=os.getpid())
        self.counters.stop_persisting()  # the last save, while the cache directory is still ours
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    # -- reporting -------------------------------------------------------------------------
    def healthy(self) -> bool:
        if not self.ready.is_set():
            return False
        if self.direct is not None and self.direct.bound:  # a bind on the same filesystem: ismount misses it
            return bool(mounts_at(self.config.mountpoint))
        return os.path.ismount(self.config.mountpoint)

    def snapshot(self) -> WorkerStats:
        return worker_stats(self)

    def snapshot_file(self, snap_id: str) -> Path | None:
        return snapshot_file(self.config, self.index, snap_id)

    def direct_stats(self) -> DirectStats:
        if self.direct is not None:
            return self.direct.stats
        return DirectStats(state="waiting" if self.config.direct else "off")


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
