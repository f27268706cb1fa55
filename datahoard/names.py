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


def cache_root(root: Path | None = None) -> Path:
    """Where the node-local caches of all Datasets live on a node."""
    return (root or host_root()) / "cache"


def cache_dir(namespace: str, name: str, root: Path | None = None) -> Path:
    """Where a Dataset's node-local cache lives on a node."""
    return cache_root(root) / namespace / name


def consumers_dir(namespace: str, name: str, root: Path | None = None) -> Path:
    """Where the CSI node plugin records the pods a Dataset is published to (one file per
    target), for that Dataset's worker alone: it mounts this directory and no other's."""
    return (root or host_root()) / "consumers" / namespace / name


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


#: Hex digits of the ``<namespace>/<name>`` digest in object names: 48 bits, so no two Datasets
#: meet by accident; a deliberate collision is still refused by the operator's uid check.
_DIGEST_LEN = 12


def _digest(namespace: str, name: str) -> str:
    # "/" cannot occur in a namespace or a Dataset name, so this text is injective.
    return hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:_DIGEST_LEN]


def _named(prefix: str, namespace: str, name: str, limit: int) -> str:
    """``<prefix>-<namespace>-<name>`` (readable, cut to fit) plus the digest of
    ``<namespace>/<name>``, which is what makes the name injective: ``team-x/data`` and
    ``team/x-data`` read alike but never share a name."""
    readable = f"{prefix}-{namespace}-{name}"[: limit - _DIGEST_LEN - 1].rstrip(".-_")
    return f"{readable}-{_digest(namespace, name)}".lower()


def node_label(namespace: str, name: str) -> str:
    """Label the operator puts on a node whose worker for this Dataset is ready.

    Injective without a digest: a namespace cannot contain ``.``, so the first dot splits it."""
    return f"dataset.{GROUP}/{_short(f'{namespace}.{name}', _LABEL_NAME_MAX)}"


def pv_name(namespace: str, name: str) -> str:
    """The Dataset's PersistentVolume (cluster-scoped, so every tenant's PVs share one space)."""
    return _named("datahoard", namespace, name, 253)


def worker_name(namespace: str, name: str) -> str:
    """DaemonSet (and Secret copy) name for a Dataset's workers, a valid DNS label."""
    return _named("dh", namespace, name, 63)


def legacy_pv_name(namespace: str, name: str) -> str:
    """The PV name operators of 0.1.x gave a Dataset (not injective); only upgrades use it."""
    return _short(f"datahoard-{namespace}-{name}", 253)


def legacy_worker_name(namespace: str, name: str) -> str:
    """The DaemonSet/Secret name 0.1.x operators used (not injective); upgrades only."""
    return _short(f"dh-{namespace}-{name}", 63).lower()
