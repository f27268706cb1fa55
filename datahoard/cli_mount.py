"""``datahoard mount``: the checks made before anything is touched, the mountpoint's lock, and
the worker, served in this process (``--foreground``) or started under a supervisor that this
command waits on until the view is live.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import mount_checks, runtime
from .cli_args import CliError, default_cache_dir
from .cli_progress import ListingProgress, wait_for_direct, wait_for_warming
from .mounts import mounts_at


def check_mount(args: argparse.Namespace) -> None:
    """Everything that can be refused without touching the mountpoint (mount_checks.py)."""
    cache_dir = args.cache_dir or default_cache_dir(args.source)
    mount_checks.check_no_credentials(args.source, args.endpoint_url)
    mount_checks.check_allow_other(args.allow_other)
    mount_checks.check_not_nested(args.mountpoint, cache_dir)
    mount_checks.check_cache_dir(cache_dir)


def lock_mountpoint(args: argparse.Namespace) -> runtime.MountLock:
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


def _worker_config(args: argparse.Namespace):
    from datahoard.cache_worker.dataset_tuning import Tuning, read_limits_from_env
    from datahoard.cache_worker.worker import WorkerConfig

    return WorkerConfig(
        source=args.source,
        mountpoint=args.mountpoint.absolute(),
        cache_dir=(args.cache_dir or default_cache_dir(args.source)).absolute(),
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


def mount_foreground(args: argparse.Namespace) -> int:
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
    progress_bar = None if report else ListingProgress()

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


#: A mount process that reports nothing (no listing progress, no readiness, no error) for this
#: long is stopped. Its own deadlines end a silent or dripping listing well before (a page
#: takes at most DATAHOARD_S3_MAX_ATTEMPTS x DATAHOARD_S3_REQUEST_TIMEOUT, 5 x 60 s by
#: default); this only bounds what nothing else does. DATAHOARD_MOUNT_TIMEOUT overrides it.
_MOUNT_SILENCE_SECONDS = 600.0


def mount_background(args: argparse.Namespace) -> int:
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
    listing = ListingProgress()
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
        wait_for_warming(stats_url)
        if args.direct:
            wait_for_direct(stats_url)
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
