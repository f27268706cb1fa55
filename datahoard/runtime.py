"""Where running mounts are recorded, so ``datahoard status DIR`` and the CSI plugin can find
a mount's worker (pid, stats URL) from nothing but its mountpoint.

One small JSON file per mount in the run directory, written when the FUSE view is live and
removed when it stops; a record whose process is gone is ignored. Next to each, a lock file
(:class:`MountLock`) serialises starting and stopping mounts on one mountpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .mounts import canonical
from .stats import WorkerStats


def run_dir() -> Path:
    if env := os.environ.get("DATAHOARD_RUN_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/datahoard")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"datahoard-{os.geteuid()}"


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    pid: int
    stats_url: str
    source: str
    cache_dir: str
    log_file: str | None = None
    #: The direct tree once it is ready (``--direct``): the CSI node plugin binds it instead of
    #: the FUSE view for new publishes.
    direct_tree: str | None = None


def canonical_mountpoint(mountpoint: str | os.PathLike) -> str:
    """``os.path.realpath(mountpoint)`` without ever stat-ing the mountpoint itself.

    realpath lstat()s every component, and an lstat of a FUSE mount's root waits for the
    daemon's answer: while the FUSE keeper holds a connection whose worker is restarting, that
    wait lasts until the new worker serves, so anything that names the mount (its lock, its
    record, the keeper entry) would hang on it. Only the parent is resolved
    (``mounts.canonical``); ``readlink`` of the last component (which never reaches the daemon:
    EINVAL for a directory) still follows a symlink named as the mountpoint, so the result
    equals realpath's.
    """
    full = canonical(mountpoint)
    try:
        os.readlink(full)
    except OSError:
        return full
    return os.path.realpath(full)


def _key(mountpoint: str | os.PathLike) -> str:
    return hashlib.sha256(canonical_mountpoint(mountpoint).encode()).hexdigest()[:24]


def _record_path(mountpoint: str | os.PathLike) -> Path:
    return run_dir() / f"mount-{_key(mountpoint)}.json"


#: Environment variable naming the FUSE keeper's socket (datahoard/fuse_keeper.py); the
#: standalone supervisor sets it for its worker, the node default needs none.
KEEPER_SOCKET_ENV = "DATAHOARD_KEEPER_SOCKET"


def keeper_socket() -> Path:
    """Where a worker finds the FUSE keeper: ``$DATAHOARD_KEEPER_SOCKET``, else the node's one
    (``<run dir>/keeper/keeper.sock``, served by the CSI node plugin; in a worker pod the run
    dir is the same hostPath, ``/var/lib/datahoard/run``)."""
    if env := os.environ.get(KEEPER_SOCKET_ENV):
        return Path(env)
    return run_dir() / "keeper" / "keeper.sock"


def mount_keeper_socket(mountpoint: str | os.PathLike) -> Path:
    """The keeper socket of one standalone mount's supervisor (one keeper per mount there)."""
    return run_dir() / "keeper" / f"mount-{_key(mountpoint)[:16]}.sock"


def supervisor_pidfile(mountpoint: str | os.PathLike) -> Path:
    """The pid of a standalone mount's supervisor, so ``umount`` can see it gone."""
    return run_dir() / f"mount-{_key(mountpoint)}.supervisor"


def register(record: MountRecord) -> None:
    path = _record_path(record.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def unregister(mountpoint: str | os.PathLike, pid: int | None = None) -> None:
    path = _record_path(mountpoint)
    record = lookup(mountpoint, check_alive=False)
    if record is not None and (pid is None or record.pid == pid):
        path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def lookup(mountpoint: str | os.PathLike, check_alive: bool = True) -> MountRecord | None:
    try:
        data = json.loads(_record_path(mountpoint).read_text())
        known = MountRecord.__dataclass_fields__
        record = MountRecord(**{k: v for k, v in data.items() if k in known})
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if check_alive and not alive(record.pid):
        return None
    return record


def fetch_stats(url: str, timeout: float = 5.0) -> WorkerStats:
    with urllib.request.urlopen(f"{url.rstrip('/')}/stats", timeout=timeout) as response:
        return WorkerStats.model_validate_json(response.read())


class MountBusy(Exception):
    """Another ``datahoard`` process holds the mountpoint's lock; the message names it."""


class MountLock:
    """An exclusive lock on one mountpoint, held from "is anything mounted here?" until the new
    mount is recorded (or has failed), so that two ``datahoard mount`` runs started at the same
    instant cannot both pass the check and stack two FUSE views (and two workers) on one
    directory. ``umount`` takes it too, so it never unmounts a view that is still starting.

    It is an ``flock`` on ``mount-<key>.lock`` next to the mount records (the key is the one
    :func:`lookup` uses), so it goes away with its holder, even one killed with SIGKILL. Taking
    it never waits: whoever holds it may be listing a large bucket for minutes.

    ``fd``: a descriptor of the lock file inherited from the parent ``datahoard mount`` that
    started this process (the background mount's worker): the lock is then already ours, and
    stays held by whichever of the two is still starting.
    """

    def __init__(self, mountpoint: str | os.PathLike, fd: int | None = None) -> None:
        self.path = _record_path(mountpoint).with_suffix(".lock")
        if fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            # Not for our children (libfuse's fusermount3 may outlive the start-up).
            os.set_inheritable(fd, False)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise MountBusy(f"pid {holder}" if holder else "another process") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the mount lock was released")
        return self._fd

    def release(self) -> None:
        """Close our descriptor; the lock is free once no process holds one (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MountLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
