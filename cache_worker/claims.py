"""Claiming this node's places before serving (step 1 of ``worker.run``): the mountpoint
(clearing a dead FUSE mount a crashed worker left) and the cache directory's lock (two
workers on one cache would corrupt each other), and the capacity the cache may grow to."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from .tree_bind import clear_tree_binds
from .worker_config import WorkerError

log = logging.getLogger(__name__)

#: How long a new worker waits for the previous owner of its cache directory to exit.
LOCK_WAIT_SECONDS = 10.0


def prepare_mountpoint(mountpoint: Path) -> None:
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


def lock_cache_dir(cache_dir: Path, allow_other: bool) -> int:
    """Create and lock the cache directory; the descriptor holds the lock until closed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not allow_other:  # the cache holds the view's bytes: as private as the view
        os.chmod(cache_dir, 0o700)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    # A worker that was just unmounted may still be shutting down: give it a moment.
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise WorkerError(f"cache directory {cache_dir} is in use by another datahoard mount") from None
            time.sleep(0.1)


def default_capacity(cache_dir: Path, used: int) -> int:
    """90% of what the cache could grow into on its filesystem."""
    return int((shutil.disk_usage(cache_dir).free + used) * 0.9)


__all__ = ["prepare_mountpoint", "lock_cache_dir", "default_capacity", "LOCK_WAIT_SECONDS"]
