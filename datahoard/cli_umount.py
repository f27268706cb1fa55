"""``datahoard umount``: unmount a datahoard view, and only that, then see its worker and its
supervisor gone, every wait bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import runtime, tree_layout
from .cli_args import CliError
from .mounts import MountEntry, mounts_at, top_mounts

#: Seconds ``umount`` waits for the worker to exit after SIGTERM.
_TERM_GRACE = 5.0


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


def umount(args: argparse.Namespace) -> int:
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
