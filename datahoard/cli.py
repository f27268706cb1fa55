"""The ``datahoard`` command: mount a dataset on one machine, show its numbers, unmount it.

Errors are one line on stderr and a non-zero exit code; ``-v`` adds the details.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import mount_checks, runtime, tree_layout
from .mount_checks import MountRefused
from .mounts import MountEntry, mounts_at, top_mounts
from .stats import WorkerStats
from .units import format_size, parse_positive_size

log = logging.getLogger("datahoard")

#: Seconds ``umount`` waits for the worker to exit once its view is gone, by default.
_UMOUNT_TIMEOUT = 30.0
#: And after SIGTERM.
_TERM_GRACE = 5.0
#: Where a fatal error is also written, when set: the operator points it at the worker
#: container's terminationMessagePath, so the kubelet puts the error in the pod's status and the
#: operator can copy it into the Dataset's WorkersReady condition (issue 14).
TERMINATION_LOG_ENV = "DATAHOARD_TERMINATION_LOG"
#: The kubelet keeps at most 4 KiB of a termination message; one line needs far less.
_TERMINATION_MESSAGE_BYTES = 1024


def _default_cache_dir(source: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "datahoard" / hashlib.sha256(source.encode()).hexdigest()[:16]


def _stats_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _size(text: str) -> int:
    """A size limit: a whole number of bytes, at least 1 (``0`` once meant "90% of the disk")."""
    try:
        return parse_positive_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is ``--help``'s job)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="datahoard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a remote dataset read-only, with a local cache")
    m.add_argument("source", help="s3://bucket/prefix/ or hdfs://namenode:9870/path/")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--cache-dir", type=Path, help="local cache directory (default: ~/.cache/datahoard/<hash>)")
    m.add_argument("--capacity", type=_size, help="cache size limit, e.g. 200Gi (default: 90%% of free disk)")
    m.add_argument("--warm", action="store_true", help="prefetch the whole dataset in the background")
    m.add_argument("--wait", action="store_true",
                   help="with --warm: return only when warming is done (with --direct: and the tree is served)")
    m.add_argument("--include", action="append", default=[], metavar="GLOB", help="only paths matching (repeatable)")
    m.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out paths matching (repeatable)")
    m.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    m.add_argument("--region")
    m.add_argument("--refresh", action="store_true", help="list the source again instead of reusing the index")
    m.add_argument("--snapshot-id", type=_snapshot_id, metavar="ID",
                   help="serve this listing snapshot (as `datahoard status` shows it) instead of listing the source "
                        "(env DATAHOARD_SNAPSHOT_ID)")
    m.add_argument("--snapshot-from", action="append", default=[], metavar="URL",
                   help="stats URL of a mount that holds it, e.g. http://10.0.0.5:9100 (repeatable; tried in order; "
                        "env DATAHOARD_SNAPSHOT_FROM, comma-separated)")
    m.add_argument("--parallelism", type=mount_checks.parallelism, default=16,
                   help=f"parallel fetches while warming, 1 to {mount_checks.MAX_PARALLELISM} (default 16)")
    m.add_argument("--bandwidth-limit", type=_size, metavar="BYTES_PER_S", help="cap warming traffic, e.g. 100M")
    m.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    m.add_argument("--stats-addr", type=_stats_addr, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="stats/metrics HTTP address (default: 127.0.0.1, any free port)")
    m.add_argument("--no-allow-other", dest="allow_other", action="store_false",
                   help="only the mounting user may read the view")
    m.add_argument("--direct", action="store_true",
                   help="once the whole dataset is cached, serve it as plain read-only files (a tree of hard "
                        "links into the cache, bind-mounted over MOUNTPOINT) with no FUSE hop: local-disk speed. "
                        "Reads of the tree never reach the worker, so the served bytes and hit ratio then count "
                        "only reads through the FUSE view")
    m.add_argument("--no-direct-bind", dest="direct_bind", action="store_false",
                   help="with --direct: build and publish the tree, but do not bind it over MOUNTPOINT "
                        "(Kubernetes workers: the CSI node plugin binds it into new pods)")
    m.add_argument("--no-kernel-opens", dest="kernel_opens", action="store_false",
                   help="keep answering every open in the worker even once the whole dataset is cached "
                        "(by default the kernel then opens files itself and fanotify counts the opens)")
    m.add_argument("--passthrough", dest="passthrough", action="store_const", const="on", default="auto",
                   help="answer opens of files whole in the cache with FUSE passthrough even when every file "
                        "fits in one chunk (by default only datasets with larger files use it: small files are "
                        "faster from the page cache, and once all are cached the kernel opens them itself)")
    m.add_argument("--no-passthrough", dest="passthrough", action="store_const", const="off",
                   help="serve every read through the worker, even of files whole in the cache")
    m.add_argument("--max-restarts", type=_restarts, default=5, metavar="N",
                   help="restart a worker that dies with an error up to N times in a row (default 5; 0: never)")
    m.add_argument("--no-keeper", dest="keeper", action="store_false",
                   help="do not hold the FUSE connection across worker restarts (a restart then remounts, and "
                        "readers see errors meanwhile)")
    m.add_argument("--consumers-dir", type=Path, metavar="DIR",
                   help="where the CSI node plugin records the pods this dataset is published to, so served "
                        "bytes are shown per pod by name (Kubernetes; without it pods are shown by UID)")
    m.add_argument("--log-file", help=argparse.SUPPRESS)
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the parent's MountLock

    s = sub.add_parser("status", help="show a mount's cache numbers")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true", help="print the raw stats document")

    u = sub.add_parser("umount", help="unmount a dataset")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=_seconds, default=_UMOUNT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the worker to exit after the unmount before stopping it "
                        f"with SIGTERM (default {_UMOUNT_TIMEOUT:g})")

    sub.add_parser("csi-node", help="run the CSI node plugin", add_help=False)
    return parser


def _snapshot_id(text: str) -> str:
    text = text.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a snapshot id (64 hex digits, as `datahoard status` "
                                         "shows it)")
    return text


def _restarts(text: str) -> int:
    if not text.isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 1000, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day, got {text}")
    return value


class CliError(Exception):
    """Printed as one line; exit code 1."""


# -- checks before a mount -----------------------------------------------------------------
def _check_mount(args: argparse.Namespace) -> None:
    """Everything that can be refused without touching the mountpoint (mount_checks.py)."""
    cache_dir = args.cache_dir or _default_cache_dir(args.source)
    mount_checks.check_no_credentials(args.source, args.endpoint_url)
    mount_checks.check_allow_other(args.allow_other)
    mount_checks.check_not_nested(args.mountpoint, cache_dir)
    mount_checks.check_cache_dir(cache_dir)


def _lock_mountpoint(args: argparse.Namespace) -> runtime.MountLock:
    """Take the mountpoint's lock and refuse a mountpoint a live datahoard mount serves.

    The check is made under the lock and before the worker starts, because the worker's first
    step clears direct-tree binds left by a crash: run against a live ``--direct`` mount, it
    would take the live tree off and so stop that mount.
    """
    try:
        lock = runtime.MountLock(args.mountpoint.absolute(), fd=args.lock_fd)
    except runtime.MountBusy as exc:
        raise CliError(f"another datahoard mount or umount of {args.mountpoint.absolute()} is in progress "
                       f"({exc}); wait for it, then use the mount or datahoard umount it") from None
    except OSError as exc:
        raise CliError(f"cannot take the mount lock in {runtime.run_dir()}: {exc.strerror or exc}") from None
    record = runtime.lookup(args.mountpoint.absolute())
    if record is not None:
        lock.release()
        raise CliError(f"{args.mountpoint.absolute()} is already served by datahoard (pid {record.pid}, "
                       f"{record.source}); datahoard umount it first")
    return lock


# -- mount ---------------------------------------------------------------------------------
def _worker_config(args: argparse.Namespace):
    from datahoard.cache_worker.dataset import Tuning, read_limits_from_env
    from datahoard.cache_worker.worker import WorkerConfig

    return WorkerConfig(
        source=args.source,
        mountpoint=args.mountpoint.absolute(),
        cache_dir=(args.cache_dir or _default_cache_dir(args.source)).absolute(),
        capacity=args.capacity,
        warm=args.warm,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        endpoint_url=args.endpoint_url,
        region=args.region,
        refresh=args.refresh,
        snapshot_id=args.snapshot_id,
        snapshot_from=tuple(args.snapshot_from),
        tuning=Tuning(warm_parallelism=args.parallelism, warm_bandwidth=args.bandwidth_limit,
                      **read_limits_from_env(os.environ)),
        stats_host=args.stats_addr[0],
        stats_port=args.stats_addr[1],
        allow_other=args.allow_other,
        log_file=args.log_file,
        direct=args.direct,
        direct_bind=args.direct_bind,
        kernel_opens=args.kernel_opens,
        passthrough=args.passthrough,
        handover=args.keeper,
        consumers_dir=args.consumers_dir,
    )


def _mount_foreground(args: argparse.Namespace) -> int:
    """Serve in this process. With --ready-fd, report progress and readiness to the parent."""
    from datahoard.cache_worker import worker

    report = os.fdopen(args.ready_fd, "w", buffering=1) if args.ready_fd is not None else None

    def say(line: str) -> None:
        if report:
            try:
                report.write(line + "\n")
            except OSError:
                pass

    config = _worker_config(args)
    progress_bar = None if report else _ListingProgress()

    def progress(what: str, n: int) -> None:
        say(f"{what} {n}")
        if progress_bar:
            progress_bar.update(n)

    def ready() -> None:
        record = runtime.lookup(config.mountpoint)
        args.mount_lock.release()  # the record guards the mountpoint from now on
        say(f"ready {record.stats_url if record else ''}")
        if report:
            report.close()

    try:
        worker.run(config, progress=progress, on_ready=ready)
    except (worker.WorkerError, worker.SourceError) as exc:
        say(f"error {exc}")
        raise CliError(str(exc)) from exc
    finally:
        if progress_bar:
            progress_bar.close()
    return 0


class _ListingProgress:
    """A spinner with the number of objects listed so far, on a terminal only."""

    def __init__(self) -> None:
        self._status = None
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True).status("listing the source...")
            self._status.start()

    def update(self, n: int) -> None:
        if self._status:
            self._status.update(f"listing the source: {n:,} objects")

    def close(self) -> None:
        if self._status:
            self._status.stop()
            self._status = None


#: A mount process that reports nothing (no listing progress, no readiness, no error) for this
#: long is stopped. Its own deadlines end a silent or dripping listing well before (a page
#: takes at most DATAHOARD_S3_MAX_ATTEMPTS x DATAHOARD_S3_REQUEST_TIMEOUT, 5 x 60 s by
#: default); this only bounds what nothing else does. DATAHOARD_MOUNT_TIMEOUT overrides it.
_MOUNT_SILENCE_SECONDS = 600.0


def _mount_background(args: argparse.Namespace) -> int:
    """Start a foreground worker as a detached child and return once its view is live.

    The child is the mount's supervisor (``datahoard/supervisor.py``): it holds the FUSE keeper
    and starts the worker, again after a crash; the worker's progress reaches us through it.
    Every wait is bounded: a child that goes quiet for ``DATAHOARD_MOUNT_TIMEOUT`` seconds, or
    does not exit after reporting an error, is stopped (its whole process group) and whatever
    it mounted is detached, so a failed mount leaves nothing mounted or running.
    """
    config = _worker_config(args)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    log_file = config.cache_dir / "worker.log"
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "datahoard.supervisor", "--mountpoint", str(config.mountpoint),
            "--ready-fd", str(write_fd), "--lock-fd", str(args.mount_lock.fileno()),
            "--max-restarts", str(args.max_restarts), *([] if args.keeper else ["--no-keeper"]),
            "--", sys.executable, "-m", "datahoard.cli", *_child_args(args, log_file)]
    with open(log_file, "ab") as log_out:
        child = subprocess.Popen(
            argv,
            pass_fds=(write_fd, args.mount_lock.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=log_out,
            start_new_session=True,
        )
    os.close(write_fd)
    listing = _ListingProgress()
    stats_url = None
    silence = float(os.environ.get("DATAHOARD_MOUNT_TIMEOUT") or _MOUNT_SILENCE_SECONDS)
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            for line in _lines_within(pipe.fileno(), silence):
                if line is None:
                    _stop_child(child, config.mountpoint, args.source)
                    raise CliError(
                        f"the mount process reported nothing for {silence:g} s "
                        f"(DATAHOARD_MOUNT_TIMEOUT) and was stopped: {_last_line(log_file)}")
                what, _, rest = line.rstrip("\n").partition(" ")
                if what == "listed":
                    listing.update(int(rest))
                elif what == "ready":
                    stats_url = rest
                    break
                elif what == "error":
                    _reap_child(child, config.mountpoint, args.source)
                    raise CliError(rest)
    finally:
        listing.close()
        args.mount_lock.release()  # recorded by now (or failed); the child holds it while starting
    if stats_url is None:
        code = _reap_child(child, config.mountpoint, args.source)
        raise CliError(f"the mount process exited ({code}) before the view was ready: {_last_line(log_file)}")
    record = runtime.lookup(config.mountpoint)
    worker_pid = record.pid if record is not None else child.pid
    print(f"mounted {args.source} at {config.mountpoint} (pid {worker_pid}, supervisor {child.pid}, log {log_file})")
    if args.warm and args.wait:
        _wait_for_warming(stats_url)
        if args.direct:
            _wait_for_direct(stats_url)
    return 0


def _lines_within(fd: int, silence: float):
    """The lines read from ``fd`` until it closes; None (and the end) once ``silence`` seconds
    pass with nothing read. Unbuffered reads, so a line already read never waits in a buffer
    while ``select`` waits for more."""
    import select

    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], silence)
        if not ready:
            yield None
            return
        data = os.read(fd, 65536)
        if not data:
            if pending:
                yield pending.decode(errors="replace")
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


def _reap_child(child: subprocess.Popen, mountpoint: Path, source: str, timeout: float = 30) -> int:
    """Wait for a mount process that is ending; stop it if it does not. Its exit code."""
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return _stop_child(child, mountpoint, source)


def _stop_child(child: subprocess.Popen, mountpoint: Path, source: str) -> int:
    """Stop a mount process and its process group, then detach a view it left mounted."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if any(m.fstype == "fuse.datahoard" and m.source == f"datahoard:{source}" for m in mounts_at(mountpoint)):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    runtime.unregister(runtime.canonical_mountpoint(mountpoint), pid=child.pid)
    return child.returncode if child.returncode is not None else -9


def _wait_for_direct(stats_url: str, timeout: float = 3600) -> None:
    """With --warm --wait --direct: return once the tree is served, or say why it is not."""
    deadline = time.monotonic() + timeout
    while True:
        stats = runtime.fetch_stats(stats_url)
        d = stats.direct
        if d.state in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if stats.serving == "direct":
        print(f"serving from the direct tree {d.path} (no FUSE hop)")
    else:
        print(f"serving through FUSE; direct tree {d.state}" + (f": {d.message}" if d.message else ""))


def _child_args(args: argparse.Namespace, log_file: Path) -> list[str]:
    """The same mount command line, made foreground; the supervisor adds where to report
    (``--ready-fd``, first start only) and the mount lock (``--lock-fd``)."""
    argv = [a for a in args.raw_argv if a != "--wait"]
    return [*argv, "--foreground", "--log-file", str(log_file)]


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _wait_for_warming(stats_url: str) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        transient=False, disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("warming", total=None)
        while True:
            stats = runtime.fetch_stats(stats_url)
            w = stats.warming
            bar.update(task, total=w.bytes_total, completed=w.bytes_done)
            if w.state not in ("running", "idle"):
                break
            time.sleep(0.5)
    if w.state == "failed":
        raise CliError(f"warming failed: {w.message or stats.last_error or w.state}")
    print(f"warmed {w.files_done} of {w.files_total} files ({format_size(stats.cached_bytes)} cached)")


# -- status / umount -----------------------------------------------------------------------
def _stats_for(mountpoint: Path) -> WorkerStats:
    record = runtime.lookup(mountpoint)
    if record is None:
        raise CliError(f"no datahoard mount is running at {mountpoint}")
    try:
        return runtime.fetch_stats(record.stats_url)
    except OSError as exc:
        raise CliError(f"cannot read stats of {mountpoint} from {record.stats_url}: {exc}") from exc


def _status(args: argparse.Namespace) -> int:
    stats = _stats_for(args.mountpoint)
    if args.json:
        print(json.dumps(stats.model_dump() | {"hit_ratio": stats.hit_ratio}, indent=2))
        return 0
    w = stats.warming
    rows = [
        ("source", stats.source),
        ("mountpoint", stats.mountpoint),
        ("ready", "yes" if stats.ready else "no"),
        ("files", f"{stats.files:,}"),
        ("snapshot", stats.snapshot or "none (a worker older than snapshots)"),
        ("total", format_size(stats.total_bytes)),
        ("cached", f"{format_size(stats.cached_bytes)} ({stats.cached_fraction:.1%}) of {format_size(stats.capacity_bytes)} capacity"),
        ("served", f"{format_size(stats.served_from_cache_bytes)} from cache, {format_size(stats.served_from_source_bytes)} from source"),
        ("hit ratio", f"{stats.hit_ratio:.3f}"),
        ("warming", f"{w.state}: {w.files_done:,}/{w.files_total:,} files, {format_size(w.bytes_per_second)}/s"
                    + (f" ({w.message})" if w.message else "")),
        ("errors", f"{stats.errors}" + (f" (last: {stats.last_error})" if stats.last_error else "")),
    ]
    if stats.consumers:
        rows.append(("readers", ", ".join(
            f"{c.namespace + '/' if c.namespace else ''}{c.pod} {format_size(c.served_bytes)}"
            + (f" (hit {c.hit_ratio:.3f})" if c.hit_ratio is not None else "") for c in stats.consumers[:3])
            + (f" and {len(stats.consumers) - 3} more" if len(stats.consumers) > 3 else "")))
    if stats.kernel_opens:
        rows.append(("kernel opens", "yes: the dataset is cached and the kernel opens files itself (still counted)"))
    d = stats.direct
    if d.state != "off" or stats.serving != "fuse":
        if stats.serving == "direct":
            rows.append(("serving", f"direct: {d.path} ({d.files:,} files, {format_size(d.bytes)}"
                                    + (f", {format_size(d.assembled_bytes)} assembled" if d.assembled_bytes else "")
                                    + "); reads there bypass the worker and are not counted in the hit ratio"))
        else:
            rows.append(("serving", "fuse"))
        if stats.serving != "direct" or d.message:
            rows.append(("direct tree", d.state + (f": {d.message}" if d.message else "")))
    if stats.skipped_keys:
        rows.append(("skipped keys", f"{stats.skipped_keys} (not valid paths)"))
    if stats.degraded:
        rows.append(("degraded", stats.degraded))
    f = stats.fuse
    rows.append(("passthrough", f"yes: {f.passthrough_opens:,} opens read by the kernel from the cache file"
                 if f.passthrough else f"no: {f.passthrough_note or 'not in use'}"))
    rows.append(("restarts", "hidden: a keeper holds the FUSE connection, a worker restart is a pause"
                 + (" (this worker resumed it)" if f.resumed else "") if f.handover
                 else f"seen by readers: {f.handover_note or 'no keeper holds the connection'}"))
    if stats.unverified_objects or stats.integrity_mismatches:
        rows.append(("integrity", f"{stats.unverified_objects} objects served unchecked (nothing the store "
                                  f"vouches for), {stats.integrity_mismatches} corrupt fetches dropped"
                                  + (f" (last: {stats.last_mismatch})" if stats.last_mismatch else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _stop_supervisor(mountpoint: Path, deadline: float) -> None:
    """After an umount: the supervisor exits once its worker has; one waiting to restart a
    worker (back-off) is told to stop. It holds an flock on its pid file until it has fully
    exited, so taking that lock is the proof it is gone. Bounded: 2 s (less near ``deadline``)
    plus the SIGTERM grace."""
    import fcntl

    path = runtime.supervisor_pidfile(mountpoint)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return

    def gone(within: float) -> bool:
        until = time.monotonic() + within
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= until:
                    return False
                time.sleep(0.05)

    try:
        if not gone(min(2.0, max(0.5, deadline - time.monotonic()))):
            pid = runtime._read_pid(fd)
            if pid is None or not _is_worker(pid):
                return
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not gone(_TERM_GRACE):
                print(f"datahoard: warning: the mount's supervisor (pid {pid}) is still running; "
                      f"stop it with kill {pid}", file=sys.stderr)
                return
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _umount(args: argparse.Namespace) -> int:
    """Unmount a datahoard view, and only that, and see its worker gone before exiting 0.

    Refused: a mountpoint with no datahoard mount on top (a tmpfs, a bind: ``fusermount3 -u``
    run as root would unmount it all the same), and one whose mount is still starting (its
    lock is held). Bounded: ``--timeout`` seconds for the unmount and the worker's exit; a
    worker still there is sent SIGTERM, and one that survives that is an error naming it.
    """
    mountpoint = args.mountpoint.absolute()
    try:
        lock = runtime.MountLock(mountpoint)
    except runtime.MountBusy as exc:
        raise CliError(f"another datahoard mount or umount of {mountpoint} is in progress ({exc}); wait "
                       f"for it to finish, or stop that process") from None
    deadline = time.monotonic() + args.timeout
    with lock:
        code = _umount_locked(mountpoint, deadline, args.timeout)
    # Outside the lock: a supervisor that wakes to restart takes it, and then finds no view.
    _stop_supervisor(mountpoint, deadline)
    return code


def _is_ours(entry: MountEntry) -> bool:
    """A datahoard FUSE view, or a direct tree's bind (``CACHE/direct/<id>``) stacked on one."""
    return entry.fstype == "fuse.datahoard" or tree_layout.tree_id(entry.root) is not None


def _umount_locked(mountpoint: Path, deadline: float, timeout: float) -> int:
    from datahoard.cache_worker.tree_bind import clear_tree_binds

    record = runtime.lookup(mountpoint)
    entries = mounts_at(mountpoint)
    top = top_mounts(entries)[-1] if entries else None
    if top is None and record is None:
        raise CliError(f"{mountpoint} is not mounted")
    if top is not None and not _is_ours(top):
        if record is None:
            raise CliError(f"{mountpoint} is not a datahoard mount (it is a {top.fstype} mount of "
                           f"{top.source}); not unmounting it")
        raise CliError(f"a {top.fstype} mount of {top.source} is stacked on the datahoard view at "
                       f"{mountpoint}; unmount it first")
    # With no live record, this is a view whose worker died: clearing it is what umount is for.
    if top is not None:
        # A direct tree's bind (--direct) sits on top of the FUSE view: take it off first.
        clear_tree_binds(mountpoint)
        result = _fusermount_u(mountpoint, deadline)

        # The worker unmounts its FUSE view itself when it sees its tree's bind go: that is success.
        def fuse_mounted() -> bool:
            return any(m.fstype.startswith("fuse") for m in mounts_at(mountpoint))

        if result.returncode != 0 and record is not None:
            until = min(deadline, time.monotonic() + 3)
            while fuse_mounted() and time.monotonic() < until:
                time.sleep(0.05)
        if result.returncode != 0 and (record is None or fuse_mounted()):
            raise CliError(result.stderr.strip() or f"fusermount3 -u {mountpoint} failed")
    if record is not None:
        _stop_worker(record, mountpoint, deadline, timeout)
    return 0


def _fusermount_u(mountpoint: Path, deadline: float) -> subprocess.CompletedProcess:
    """``fusermount3 -u``, retried while busy, never past ``deadline``."""
    # Busy can be brief: opens the kernel served hold the mount until the worker has counted
    # them (fanotify, see cache_worker/open_watch.py), a few milliseconds after a burst.
    for _ in range(20):
        try:
            result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise CliError(f"fusermount3 -u {mountpoint} did not finish in time; the view may still "
                           f"be mounted (fusermount3 -uz {mountpoint} detaches it)") from None
        except FileNotFoundError:
            raise CliError("fusermount3 is not installed (apt-get install fuse3)") from None
        if result.returncode == 0 or "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return result


def _is_worker(pid: int) -> bool:
    """Still a datahoard process (not a pid reused since the record was written)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"datahoard" in f.read()
    except OSError:
        return False


def _stop_worker(record: runtime.MountRecord, mountpoint: Path, deadline: float, timeout: float) -> None:
    """Exit 0 only once the worker is gone: wait, then SIGTERM, then say it is still there."""
    pid = record.pid
    _wait_for_exit(pid, deadline - time.monotonic())
    if not runtime.alive(pid):
        return
    log_hint = f" (log {record.log_file})" if record.log_file else ""
    if _is_worker(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        _wait_for_exit(pid, _TERM_GRACE)
        if not runtime.alive(pid):
            print(f"datahoard: warning: the worker (pid {pid}) had not exited {timeout:g} s after the "
                  f"unmount; stopped it with SIGTERM{log_hint}", file=sys.stderr)
            return
    raise CliError(f"{mountpoint} is unmounted, but its worker (pid {pid}) is still running "
                   f"{timeout + _TERM_GRACE:g} s later, even after SIGTERM{log_hint}; "
                   f"stop it with kill -9 {pid}")


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and runtime.alive(pid):
        time.sleep(0.05)


# -- entry point ---------------------------------------------------------------------------
def _fatal(message: str) -> int:
    """One line on stderr and, in a pod, the termination message; exit code 1."""
    print(f"datahoard: error: {message}", file=sys.stderr)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        text = message.encode()[:_TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
        try:
            Path(path).write_text(text + "\n")
        except OSError as exc:  # the error itself is on stderr already
            log.debug("cannot write the termination message to %s: %s", path, exc)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["csi-node"]:
        from datahoard.csi_node.server import main as csi_main

        return csi_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.raw_argv = list(argv)
    level = logging.WARNING - 10 * args.verbose
    if args.command == "mount" and args.foreground:
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mount":
            _check_mount(args)
            with _lock_mountpoint(args) as args.mount_lock:
                return _mount_foreground(args) if args.foreground else _mount_background(args)
        if args.command == "status":
            return _status(args)
        if args.command == "umount":
            return _umount(args)
    except (CliError, MountRefused) as exc:
        return _fatal(str(exc))
    except OSError as exc:  # the machine said no (permissions, a full disk, ...): one line too
        log.debug("details", exc_info=True)
        return _fatal(str(exc))
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
