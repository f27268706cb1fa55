"""One mount of one dataset: wire source, index, store, cache, warmer, stats and FUSE together.

``run`` is what ``datahoard mount --foreground`` and the Kubernetes worker pod execute. The
order matters:

1. take the cache directory's lock (two workers on one cache would corrupt each other);
2. reuse the index, or list the source into a new one (``--refresh``, or the source changed);
3. open the chunk store (dropping leftovers of a crash);
4. start the stats endpoint, then the FUSE view; once libfuse reports the mount live, record
   the mount, start warming and tell the caller it is ready;
5. once every file of a dataset whose files are all at most one chunk is cached (by warming or
   by reads), the FUSE view hands opens to the kernel (``DatasetFS.serve_opens_in_kernel``):
   a warm epoch then costs this process nothing, and fanotify keeps the counts;
6. with ``direct``: once the dataset is fully cached (warming done, or found so at start-up),
   build the direct tree (``tree.py``), pin its chunks, and publish it: the mount record names
   it (the CSI node plugin binds it into new pods) and, with ``direct_bind``, a read-only bind
   of it is stacked over the mountpoint, so new opens bypass FUSE while descriptors already
   open on the FUSE view keep working;
7. on unmount or SIGTERM: stop warming, remove the tree's bind, flush the store, remove the
   record.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from datahoard import runtime
from datahoard.mounts import bind_readonly, detach, mounts_at
from datahoard.stats import ConsumerStats, DirectStats, FuseStats, RecentStats, WarmingStats, WorkerStats

from .consumers import ConsumerTable, PodNames
from .counters import Counters
from .dataset import DatasetCache, Tuning
from .attach import Attacher, Attachment, deposit, index_identity, keep_deposited
from .fs import MAX_READ, METADATA_TIMEOUT, RESERVE_THREADS, DatasetFS
from . import snapshot
from .index import Index, IndexSummary, build_index_from, read_summary
from .keys import KeyFilter
from .settings import SourceSettings
from .source import Source, SourceError
from .sources import open_source
from .stats_server import StatsServer
from .store import ChunkStore
from .tree import DirectTrees, TreeError, TreeInfo
from .tree_bind import clear_tree_binds
from .tree_bind import top_is_tree_bind as _top_is_tree_bind
from .warm import Warmer

log = logging.getLogger(__name__)

#: How long a new worker waits for the previous owner of its cache directory to exit.
_LOCK_WAIT_SECONDS = 10.0
#: How often a worker whose cache disk filled looks for room again (a statvfs while full).
_ROOM_CHECK_SECONDS = 1.0


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
    #: or "auto": only for a dataset with a file larger than one chunk. Measured (bench/RESULTS.md):
    #: for small files passthrough's open and release, answered in Python, cost 0.10-0.14 of local
    #: disk on warm epochs, where keep_cache and then kernel opens give about 0.5 (and the two
    #: cannot share a connection: answering an open ENOSYS gives passthrough up); for shards it
    #: is 0.9-1.4 of local disk against 0.03 through the worker.
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


def _prepare_mountpoint(mountpoint: Path) -> None:
    """Create the mountpoint, clearing a dead FUSE mount left by a crashed worker."""
    clear_tree_binds(mountpoint)
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


def _empty_view_problem(cfg: WorkerConfig, summary) -> str | None:
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


def _default_capacity(cache_dir: Path, used: int) -> int:
    """90% of what the cache could grow into on its filesystem."""
    return int((shutil.disk_usage(cache_dir).free + used) * 0.9)


class Worker:
    def __init__(self, config: WorkerConfig, progress: Progress | None = None) -> None:
        self.config = config
        self._progress = progress or (lambda what, n: None)
        self.counters = Counters()
        self.counters.consumers = ConsumerTable(names=PodNames(config.consumers_dir))
        self.ready = threading.Event()
        self._lock_fd: int | None = None
        self.source: Source | None = None
        self.index: Index | None = None
        self.store: ChunkStore | None = None
        self.cache: DatasetCache | None = None
        self.warmer: Warmer | None = None
        self.stats: StatsServer | None = None
        self.trees: DirectTrees | None = None
        self.direct = DirectStats(state="waiting" if config.direct else "off")
        self.serving = "fuse"
        self.view: DatasetFS | None = None
        self.attacher: Attacher | None = None
        self.attachment: Attachment | None = None
        self.session = None
        self._handing_over = False
        self._bound = False
        self._direct_stop = threading.Event()
        self._direct_thread: threading.Thread | None = None
        self._record: runtime.MountRecord | None = None

    # -- steps -----------------------------------------------------------------------------
    def _lock_cache_dir(self) -> None:
        cfg = self.config
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.allow_other:  # the cache holds the view's bytes: as private as the view
            os.chmod(cfg.cache_dir, 0o700)
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
        """The index to serve: reused, built from the snapshot asked for, or listed afresh.

        Whatever its origin, the index is built from a snapshot file (snapshot.py) by the same
        code, so two workers with the same snapshot id serve the same view."""
        cfg = self.config
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
                summary = self._index_snapshot(wanted, peers, path, key_filter)
        elif usable and not cfg.refresh:
            log.info("reusing the index of snapshot %s (%d files, built at %s)", summary.snapshot,
                     summary.files, summary.built_at)
        else:
            reason = ("asked to" if cfg.refresh else "no index yet" if summary is None
                      else "the index predates snapshots" if summary.snapshot is None else "source changed")
            log.info("listing %s (%s)", cfg.source, reason)
            snap_id, _, listed = snapshot.write(self.source.list(), cfg.source, cfg.cache_dir,
                                                lambda n: self._progress("listed", n))
            log.info("listed %d objects: snapshot %s", listed, snap_id)
            summary = self._build(snap_id, path, key_filter)
        snapshot.remove_others(cfg.cache_dir, summary.snapshot or "")
        if problem := _empty_view_problem(cfg, summary):
            path.unlink(missing_ok=True)  # list again next time: the objects may be there by then
            raise WorkerError(problem)
        return Index(path)

    def _index_snapshot(self, snap_id: str, peers: tuple[str, ...], path: Path,
                        key_filter: KeyFilter) -> IndexSummary:
        """Index snapshot ``snap_id``: from the cache directory if it is there, else a peer."""
        cfg = self.config
        if not (cfg.cache_dir / snapshot.file_name(snap_id)).exists():
            if not peers:
                raise WorkerError(f"snapshot {snap_id} is not in {cfg.cache_dir} and no peer was given "
                                  "to fetch it from (--snapshot-from URL)")
            log.info("fetching snapshot %s from %s", snap_id, ", ".join(peers))
            try:
                snapshot.fetch(peers, snap_id, cfg.cache_dir)
            except snapshot.SnapshotError as exc:
                raise WorkerError(str(exc)) from None
        return self._build(snap_id, path, key_filter)

    def _build(self, snap_id: str, path: Path, key_filter: KeyFilter) -> IndexSummary:
        cfg = self.config
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

    def snapshot_file(self, snap_id: str) -> Path | None:
        """The file of the snapshot this worker serves, if ``snap_id`` names it."""
        current = self.index.summary.snapshot if self.index else None
        if current is None or snap_id != current:
            return None
        file = self.config.cache_dir / snapshot.file_name(current)
        return file if file.exists() else None

    def prepare(self) -> None:
        """Everything before the FUSE mount; raises WorkerError / SourceError with a clear message."""
        cfg = self.config
        # Claim a held connection before anything touches the mountpoint (attach.py).
        self.attacher = Attacher(cfg.mountpoint, cfg.handover, cfg.keeper_socket)
        if not self.attacher.resuming:
            _prepare_mountpoint(cfg.mountpoint)
        self._lock_cache_dir()
        self.counters.persist(cfg.cache_dir)  # continue the counts of the last run (counters.py)
        self.source = open_source(cfg.source, cfg.endpoint_url, cfg.region)
        self.index = self._open_index()
        self.store = ChunkStore(cfg.cache_dir / "chunks", capacity=1 << 62, private=not cfg.allow_other)
        self.store.capacity = cfg.capacity or _default_capacity(cfg.cache_dir, self.store.used_bytes)
        self.cache = DatasetCache(self.source, self.store, self.counters, cfg.tuning)
        if cfg.direct:
            self.trees = DirectTrees(cfg.cache_dir, self.index, self.cache)
        self.stats = StatsServer((cfg.stats_host, cfg.stats_port), self.snapshot, self.healthy,
                                 snapshot_file=self.snapshot_file)
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
        if cfg.warm:
            self.warmer = Warmer(self.index, self.cache, self.counters, cfg.tuning.warm_parallelism)
            self.warmer.start()
        if self.trees is not None:
            self._direct_thread = threading.Thread(target=self._direct_loop, name="direct", daemon=True)
            self._direct_thread.start()
        if cfg.kernel_opens:
            threading.Thread(target=self._kernel_opens_when_cached, name="kernel-opens", daemon=True).start()
        threading.Thread(target=self._watch_for_room, name="cache-room", daemon=True).start()
        self.ready.set()
        log.info("serving %s at %s (stats %s)", cfg.source, cfg.mountpoint, self.stats.url)

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Mount (or resume) and serve until unmounted or signalled.

        SIGTERM and SIGINT stop the session. With a keeper holding the connection that is a
        handover: requests in flight are answered and the mount stays for the next worker.
        Without one the view is unmounted, as a stop always did.
        """
        from .fusell.passthrough import BackingTable
        from .fusell.session import Session, Wants

        cfg = self.config
        identity = index_identity(self.index.summary)
        att = self.attacher.resume(identity)
        backing_log = cfg.cache_dir / "fuse-backing.log"
        if att is None:
            backing_log.unlink(missing_ok=True)  # it belonged to a connection that is gone
            att = self.attacher.mount(f"datahoard:{cfg.source}", cfg.allow_other)
        self.attachment = att
        backing = BackingTable(backing_log, att.conn) if self._use_passthrough() else None
        view = self.view = DatasetFS(self.index, self.cache, self.counters, str(cfg.mountpoint), backing=backing)
        background = cfg.tuning.max_waiting_reads + RESERVE_THREADS
        want = Wants(max_read=MAX_READ, max_background=background, congestion_threshold=background * 3 // 4,
                     passthrough=cfg.passthrough != "off", entry_timeout=METADATA_TIMEOUT, attr_timeout=METADATA_TIMEOUT)
        session = self.session = Session(att.conn, view, threads=background, want=want)

        def mounted() -> None:
            if not self._wait_until_live(session):
                return
            deposit(att, identity)
            if att.resumed:
                att.conn.notify_resend()  # what the last worker read but did not answer
            if cfg.handover:
                threading.Thread(target=keep_deposited, args=(att, identity, cfg.keeper_socket, self._direct_stop),
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
        if cfg.passthrough == "auto":
            self._large_files = self.index.max_file_size() > cfg.tuning.whole_file_max
            return self._large_files
        return cfg.passthrough == "on"

    def _wait_until_live(self, session) -> bool:
        deadline = time.monotonic() + 30
        while not session.ready.wait(0.05):
            if time.monotonic() > deadline:
                log.error("the kernel did not start the FUSE connection at %s", self.config.mountpoint)
                return False
        while not os.path.ismount(self.config.mountpoint):
            if time.monotonic() > deadline:
                log.error("the FUSE view did not appear at %s", self.config.mountpoint)
                return False
            time.sleep(0.01)
        return True

    def _on_stop_signal(self, signum: int, frame) -> None:
        att = self.attachment
        if att is not None and att.handover and self._record is not None:
            self._handing_over = True
            log.info("stopping: handing the FUSE connection over to the next worker (the mount stays)")
        else:
            log.info("stopping: unmounting %s", self.config.mountpoint)
            try:
                from .fusell.session import unmount

                unmount(self.config.mountpoint, lazy=True)
            except OSError as exc:
                log.warning("unmounting %s failed: %s", self.config.mountpoint, exc)
        if self.session is not None:
            self.session.stop()

    # -- kernel opens ----------------------------------------------------------------------
    def _kernel_opens_when_cached(self) -> None:
        """Hand opens to the kernel once every file is cached, by warming or by reads (step 5)."""
        att = self.attachment
        if self.view is not None and self.view.backing is not None and att is not None and att.conn.state \
                and att.conn.state.passthrough:
            # Answering an open with ENOSYS gives up passthrough for the whole connection, and the
            # two together failed reads with EIO after a handover (seen with the restart test).
            log.info("opens stay in the worker: passthrough serves cached files")
            return
        largest = self.index.max_file_size()
        if largest > self.config.tuning.whole_file_max:
            log.info("opens stay in the worker: files of up to %d bytes are counted read by read", largest)
            return
        checked_at = -1
        while not self._direct_stop.wait(1.0):
            used = self.store.used_bytes if self.store else 0
            # Cheap test first; the full check runs again only once the cache has changed.
            if self.counters.warm.state == "running" or used < self.index.total_bytes or used == checked_at:
                continue
            checked_at = used
            if not all(self.cache.is_cached(obj) for obj in self.index.walk_files()):
                continue
            try:
                self.view.serve_opens_in_kernel()
            except OSError as exc:
                log.info("opens stay in the worker: %s", exc)
                return
            log.info("the dataset is cached: the kernel serves opens now (counted with fanotify)")
            return

    def _watch_for_room(self) -> None:
        """While the cache disk is full, look for room every second (``ChunkStore.recheck_room``):
        once the kernel answers reads itself, no fill comes to notice it (issue 17). Warming that
        ran meanwhile read what it could not store through and ended: warm again, for the rest."""
        while not self._direct_stop.wait(_ROOM_CHECK_SECONDS):
            cache = self.cache
            if cache is None or not cache.recheck_room():
                continue
            if self.config.warm and self.warmer is not None and self.counters.warm.state != "running" \
                    and not self._direct_stop.is_set():
                log.info("warming again: the cache disk has room for what it could not take before")
                self.warmer = Warmer(self.index, cache, self.counters, self.config.tuning.warm_parallelism)
                self.warmer.start()

    # -- direct tree -----------------------------------------------------------------------
    def _set_direct(self, state: str, message: str | None = None, info: TreeInfo | None = None) -> None:
        if info is not None:
            self.direct = DirectStats(state=state, path=info.path, files=info.files, bytes=info.bytes,
                                      assembled_bytes=info.assembled_bytes, message=message)
        else:
            self.direct = DirectStats(state=state, message=message)

    def _should_build(self, last_attempt: tuple | None) -> tuple | None:
        """The reason to try a build now (also the key that stops retrying the same state)."""
        w = self.counters.warm
        if self.warmer is not None and w.state == "running":
            return None
        key = (w.state, w.files_done, self.store.used_bytes)
        if key == last_attempt:
            return None
        complete = w.state == "done" and w.files_done == w.files_total
        if complete or self.store.used_bytes >= self.index.total_bytes:
            return key
        return None

    def _direct_loop(self) -> None:
        trees, stop = self.trees, self._direct_stop
        try:
            trees.recover()
            info = trees.load(trees.id)
            if info is not None:
                self._set_direct("verifying", "checking the tree left by the last run against the cache")
                try:
                    trees.verify(info, stop)
                    self._direct_ready(info)
                except TreeError as exc:
                    log.error("the direct tree %s cannot be reused: %s", info.path, exc)
                    self._set_direct("failed", f"the tree of the last run cannot be reused: {exc}")
                    trees.discard_current()  # unless a mount still holds it; a later build replaces it
            last_attempt: tuple | None = None
            last_cleanup = last_bind_check = time.monotonic()
            while not stop.wait(0.2):
                if self._bound and time.monotonic() - last_bind_check > 1:
                    last_bind_check = time.monotonic()
                    self._check_bind()
                if trees.current is None:
                    key = self._should_build(last_attempt)
                    if key is not None:
                        last_attempt = key
                        self._set_direct("building")
                        try:
                            self._direct_ready(trees.build(stop))
                        except TreeError as exc:
                            if stop.is_set():
                                return
                            log.warning("no direct tree: %s", exc)
                            self._set_direct("failed", str(exc))
                    elif self.direct.state == "waiting" and self.direct.message is None:
                        self._set_direct("waiting", "serving through FUSE until the whole dataset is cached")
                for rel in trees.pending_repairs():
                    try:
                        trees.repair(rel)
                    except (OSError, TreeError) as exc:
                        message = f"direct tree: cannot relink {rel}: {exc}"
                        log.error(message)
                        self.counters.add_error(message)
                if time.monotonic() - last_cleanup > 30:
                    last_cleanup = time.monotonic()
                    trees.remove_unused()
        except Exception as exc:  # noqa: BLE001 - reported; the FUSE view keeps serving
            log.exception("direct tree management failed")
            self._set_direct("failed", f"internal error: {exc}")

    def _direct_ready(self, info: TreeInfo) -> None:
        """Publish a complete, verified tree: record it, and bind it over the mountpoint."""
        cfg = self.config
        self.trees.current = info
        message = None
        if cfg.direct_bind:
            try:
                bind_readonly(info.path, cfg.mountpoint, [])
                self._bound = True
            except OSError as exc:
                message = f"the tree is ready but could not be bound over {cfg.mountpoint}: {exc}"
                log.error(message)
        if self._record is not None:
            self._record = runtime.MountRecord(**{**self._record.__dict__, "direct_tree": info.path})
            runtime.register(self._record)
        self._set_direct("ready", message, info)
        if message is None:
            self.serving = "direct"
        log.info("serving %s from the direct tree %s", cfg.source, info.path)

    def _check_bind(self) -> None:
        """The tree's bind was taken off the mountpoint (``umount``, ``fusermount3 -u``): that
        asks for an unmount, so unmount the FUSE view underneath as well, and stop."""
        mountpoint = self.config.mountpoint
        if _top_is_tree_bind(mountpoint):
            return
        self._bound = False
        self.serving = "fuse"
        log.info("the direct tree's bind was removed from %s; unmounting the FUSE view too", mountpoint)
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)

    def _unbind(self) -> None:
        """Remove the tree's bind (and, behind it, a FUSE view libfuse could not unmount)."""
        mountpoint = self.config.mountpoint
        clear_tree_binds(mountpoint)
        self._bound = False
        self.serving = "fuse"
        # libfuse unmounts the *top* mount at exit: if that was the tree's bind, the FUSE view
        # itself is still there, dead. It is ours; detach it.
        for entry in mounts_at(mountpoint):
            if entry.fstype == "fuse.datahoard" and entry.source == f"datahoard:{self.config.source}":
                try:
                    detach(mountpoint)
                except OSError as exc:
                    log.warning("cannot detach the FUSE view at %s: %s", mountpoint, exc)
                break

    def shutdown(self) -> None:
        log.info("shutting down")
        self.ready.clear()
        self._direct_stop.set()
        if self._direct_thread is not None:
            self._direct_thread.join(timeout=30)
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
        if self.config.direct and self._record is not None and not self._handing_over:
            self._unbind()  # only what this worker mounted
        self._let_go_of_connection()
        runtime.unregister(runtime.canonical_mountpoint(self.config.mountpoint), pid=os.getpid())
        self.counters.stop_persisting()  # the last save, while the cache directory is still ours
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    def _let_go_of_connection(self) -> None:
        """End the lease; after an unmount (not a handover) the keeper lets go of it too."""
        att, self.attachment = self.attachment, None
        if self.view is not None and self.view.backing is not None:
            self.view.backing.close()
        if att is not None:
            if att.keeper is not None and not self._handing_over:
                try:
                    att.keeper.release(self.config.mountpoint)
                except Exception as exc:  # noqa: BLE001 - the keeper drops ended connections anyway
                    log.debug("releasing the connection: %s", exc)
            att.conn.close()
        if self.attacher is not None:
            self.attacher.close()  # the lease (the keeper connection) ends here

    # -- reporting -------------------------------------------------------------------------
    def healthy(self) -> bool:
        if not self.ready.is_set():
            return False
        if self._bound:  # a bind of a tree on the same filesystem is invisible to ismount
            return bool(mounts_at(self.config.mountpoint))
        return os.path.ismount(self.config.mountpoint)

    def snapshot(self) -> WorkerStats:
        if self.view is not None:
            self.view.drain_opens()
        c = self.counters
        store = self.store
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
                degraded=c.degraded or (store.problem if store else None),
                unverified_objects=c.unverified_objects,
                integrity_mismatches=c.integrity_mismatches,
                last_mismatch=c.last_mismatch,
            )
            window, recent_cache, recent_served = c.recent()
        recent = RecentStats(window_seconds=window, served_from_cache_bytes=recent_cache,
                             served_bytes=recent_served)
        return WorkerStats(
            source=self.config.source,
            mountpoint=str(self.config.mountpoint),
            ready=self.healthy(),
            files=self.index.files if self.index else 0,
            total_bytes=self.index.total_bytes if self.index else 0,
            cached_bytes=store.used_bytes if store else 0,
            capacity_bytes=store.capacity if store else 0,
            skipped_keys=self.index.summary.skipped_keys if self.index else 0,
            snapshot=self.index.summary.snapshot if self.index else None,
            warming=warming,
            serving=self.serving,
            kernel_opens=self.view is not None and self.view.kernel_opens,
            direct=self.direct,
            recent=recent,
            fuse=self._fuse_stats(),
            consumers=self._consumer_stats(),
            **counts,
        )


    def _consumer_stats(self) -> list[ConsumerStats]:
        table = self.counters.consumers
        return [ConsumerStats(namespace=c.namespace, pod=c.pod, served_from_cache_bytes=c.from_cache,
                              served_from_source_bytes=c.from_source)
                for c in (table.snapshot() if table is not None else [])]

    def _fuse_stats(self) -> FuseStats:
        att, view = self.attachment, self.view
        state = att.conn.state if att is not None else None
        passthrough = bool(view is not None and view.backing is not None and state is not None and state.passthrough)
        if self.config.passthrough == "off":
            why = "off (--no-passthrough)"
        elif self.config.passthrough == "auto" and not getattr(self, "_large_files", True):
            why = ("every file fits in one chunk: served from the page cache, and once all are cached the kernel "
                   "opens them itself (faster for small files; --passthrough forces it)")
        elif state is not None and not state.passthrough:
            why = "the kernel does not offer FUSE passthrough (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
        else:
            why = None
        if view is not None and view.kernel_opens:
            why = "the kernel opens files itself (a fully cached dataset of small files): no opens to pass through"
            passthrough = False
        return FuseStats(
            passthrough=passthrough,
            passthrough_note=None if passthrough else why,
            handover=bool(att is not None and att.handover),
            handover_note=None if att is None or att.handover else att.note,
            resumed=bool(att is not None and att.resumed),
            passthrough_opens=view.passthrough_opens if view is not None else 0,
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
