"""Where running mounts are recorded, so ``datahoard status DIR`` and the CSI plugin can find
a mount's worker (pid, stats URL) from nothing but its mountpoint.

One small JSON file per mount in the run directory, written when the FUSE view is live and
removed when it stops; a record whose process is gone is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

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


def _record_path(mountpoint: str | os.PathLike) -> Path:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]
    return run_dir() / f"mount-{key}.json"


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
