"""Finding a Dataset's FUSE view on this node and telling whether it is live.

The cache worker mounts the view at ``names.mount_dir(namespace, name)`` under the host root.
A view is *live* when something is mounted there and the filesystem answers; an empty directory
is never published, because a pod would then see an empty dataset instead of an error.

A worker started with ``--direct`` also builds a *direct tree* once the dataset is fully
cached: the same files as plain read-only files under its cache directory, laid out as
``datahoard.tree_layout`` says (the worker writes that layout, the plugin reads it) and named
in its mount record when ready. New publishes bind that tree instead of the FUSE view (:func:`ready_tree`); a tree is
accepted only inside that Dataset's own cache directory, with its manifest, so a record can
never make the plugin bind another host directory. While a target binds a tree, a reference
file (``tree_layout.add_ref``) tells the worker not to delete it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datahoard import names, runtime, tree_layout
from datahoard.mounts import canonical

from .errors import InvalidArgument, NotFound, Unavailable
from .mounter import Health, Mounter, Probe

log = logging.getLogger(__name__)

#: Kubernetes namespaces are DNS labels and Dataset names DNS subdomains; checking this keeps
#: "..", "/" and friends out of the host path built from them.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

#: How often a waiting NodePublish looks at the view again. Mounting is cheap to check
#: (mountinfo + statvfs) and a worker usually becomes live within seconds.
POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class ViewRef:
    namespace: str
    name: str
    path: str


def _check_name(value: str, what: str, volume_id: str) -> str:
    if not _NAME.match(value) or ".." in value:
        raise InvalidArgument(f"volume {volume_id}: {what} {value!r} is not a valid Kubernetes name")
    return value


def resolve_view(volume_id: str, volume_context: Mapping[str, str], host_root: Path) -> ViewRef:
    """Where the FUSE view for this volume lives, from volume_context or the volume handle.

    1. Namespace and name come from the PV's volumeAttributes (``names.CTX_NAMESPACE`` and
       ``names.CTX_NAME``) when present, otherwise from the volume handle ``<ns>/<name>``.
       (Inline ephemeral volumes have a generated volume_id, so only the attributes work there.)
    2. The view is ``names.mount_dir(ns, name, host_root)``. An explicit ``names.CTX_MOUNT_DIR``
       is honoured only inside ``<host_root>/mnt``: a PV must never be able to bind an arbitrary
       host directory into a pod.
    """
    ns, name = volume_context.get(names.CTX_NAMESPACE), volume_context.get(names.CTX_NAME)
    if not (ns and name):
        try:
            ns, name = names.parse_volume_handle(volume_id)
        except ValueError:
            raise InvalidArgument(
                f"volume {volume_id}: the volume id is not <namespace>/<name> and volume_context "
                f"has no {names.CTX_NAMESPACE}/{names.CTX_NAME}"
            ) from None
    _check_name(ns, "namespace", volume_id)
    _check_name(name, "Dataset name", volume_id)
    path = str(names.mount_dir(ns, name, host_root))
    explicit = volume_context.get(names.CTX_MOUNT_DIR)
    if explicit:
        allowed = os.path.join(os.path.realpath(host_root / "mnt"), "")
        candidate = canonical(explicit)
        if not candidate.startswith(allowed):
            raise InvalidArgument(
                f"volume {volume_id}: {names.CTX_MOUNT_DIR}={explicit!r} is outside {allowed}; the plugin's "
                "--host-root (DATAHOARD_HOST_ROOT) must be the operator's host root, mounted at the same path"
            )
        path = candidate
    return ViewRef(ns, name, canonical(path))


def ready_tree(view: ViewRef, host_root: Path) -> str | None:
    """The direct tree the Dataset's worker reports ready, or None (then the FUSE view is bound).

    Accepted only as ``<cache_dir(ns, name)>/direct/<id>``, resolved, a directory, with the
    manifest the worker writes just before publishing it.
    """
    record = runtime.lookup(view.path, check_alive=False)
    if record is None or not record.direct_tree:
        return None
    tree = os.path.realpath(record.direct_tree)
    cache = names.cache_dir(view.namespace, view.name, host_root)
    if not tree_layout.in_cache(tree, cache):
        log.warning("ignoring direct tree %r of %s/%s: not inside %s", record.direct_tree, view.namespace,
                    view.name, tree_layout.direct_dir(cache))
        return None
    return tree if tree_layout.is_complete(tree) else None


def view_of_tree(tree: str, host_root: Path) -> str | None:
    """The FUSE view of the Dataset whose cache holds *tree* (for the worker's stats)."""
    owner = tree_layout.dataset_of_tree(tree, host_root)
    return str(names.mount_dir(*owner, host_root)) if owner else None


def check_view(mounter: Mounter, path: str, probe_timeout: float) -> Probe:
    """Probe the view: OK (with its device) only when a filesystem is mounted there and answers.

    A direct tree is a plain directory: it is live when it answers.
    """
    if tree_layout.tree_id(path) is not None and os.path.isdir(path):
        return mounter.probe(path, probe_timeout)
    # mountinfo first: a stat of a mount point goes to its filesystem, which may hang.
    if not mounter.mounts_at(path):
        if not os.path.lexists(path):
            return Probe(Health.MISSING, detail="no such directory")
        return Probe(Health.ERROR, detail="nothing is mounted there (cache worker not running?)")
    return mounter.probe(path, probe_timeout)


def wait_live(
    mounter: Mounter,
    volume_id: str,
    view: ViewRef,
    timeout: float,
    probe_timeout: float,
    stop: threading.Event | None = None,
) -> Probe:
    """Wait up to *timeout* seconds for the view to be live.

    Gives up with NOT_FOUND when the view's directory never appeared (no worker for this
    Dataset on this node), and with UNAVAILABLE when it exists but is not live yet; both let
    kubelet retry, UNAVAILABLE without even marking the mount as failed.
    """
    deadline = time.monotonic() + timeout
    while True:
        probe = check_view(mounter, view.path, probe_timeout)
        if probe.health is Health.OK:
            return probe
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            break
        time.sleep(POLL_INTERVAL)
    if probe.health is Health.MISSING:
        raise NotFound(
            f"volume {volume_id}: no FUSE view at {view.path} on this node after {timeout:g}s; "
            f"is the cache worker for Dataset {view.namespace}/{view.name} scheduled here?"
        )
    raise Unavailable(
        f"volume {volume_id}: the FUSE view at {view.path} is not live after {timeout:g}s "
        f"({probe.health.value}: {probe.detail}); kubelet will retry"
    )
