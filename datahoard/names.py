"""Names and host paths shared by every component.

The operator, the cache worker and the CSI node plugin meet only through these names: the
operator schedules a worker that mounts its FUSE view at :func:`mount_dir`, labels the node with
:func:`node_label`, and writes a PV whose volumeAttributes carry the keys below; the node plugin
finds the FUSE view from those attributes. Keeping them in one module is what stops them from
drifting apart.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

GROUP = "datahoard.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Dataset"
PLURAL = "datasets"
SHORT_NAME = "dset"

CSI_DRIVER_NAME = "csi.datahoard.io"
SYSTEM_NAMESPACE = "datahoard-system"

#: Root of everything Datahoard keeps on a node. ``DATAHOARD_HOST_ROOT`` overrides it so that
#: tests (and unusual node layouts) can use another directory.
DEFAULT_HOST_ROOT = Path("/var/lib/datahoard")

#: Port of a cache worker's stats/metrics HTTP endpoint inside Kubernetes.
WORKER_STATS_PORT = 9470

# volumeAttributes on the PV, handed to NodePublishVolume as volume_context.
CTX_NAMESPACE = "datahoard.io/namespace"
CTX_NAME = "datahoard.io/name"
CTX_MOUNT_DIR = "datahoard.io/mountDir"

#: Kubernetes label names are at most 63 characters after the prefix.
_LABEL_NAME_MAX = 63


def host_root() -> Path:
    return Path(os.environ.get("DATAHOARD_HOST_ROOT", str(DEFAULT_HOST_ROOT)))


def mount_dir(namespace: str, name: str, root: Path | None = None) -> Path:
    """Where a Dataset's FUSE view lives on a node (shared mount propagation)."""
    return (root or host_root()) / "mnt" / namespace / name


def cache_dir(namespace: str, name: str, root: Path | None = None) -> Path:
    """Where a Dataset's node-local cache lives on a node."""
    return (root or host_root()) / "cache" / namespace / name


def run_dir(root: Path | None = None) -> Path:
    """Where workers on a node record their mounts (``datahoard.runtime``), so that the CSI
    node plugin, in another pod, finds a view's worker and its stats endpoint."""
    return (root or host_root()) / "run"


def volume_handle(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def parse_volume_handle(handle: str) -> tuple[str, str]:
    namespace, sep, name = handle.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"volume handle {handle!r} is not <namespace>/<name>")
    return namespace, name


def _short(text: str, limit: int) -> str:
    """Keep a name readable but unique when it must fit a length limit."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('.-_')}-{digest}"


def node_label(namespace: str, name: str) -> str:
    """Label the operator puts on a node whose worker for this Dataset is ready."""
    return f"dataset.{GROUP}/{_short(f'{namespace}.{name}', _LABEL_NAME_MAX)}"


def pv_name(namespace: str, name: str) -> str:
    return _short(f"datahoard-{namespace}-{name}", 253)


def worker_name(namespace: str, name: str) -> str:
    """DaemonSet (and Secret copy) name for a Dataset's workers, a valid DNS label."""
    return _short(f"dh-{namespace}-{name}", 63).lower()
