"""Finalize: remove everything a deleted Dataset made, in an order that loses nothing in use.

Run by the kopf delete handler behind the finalizer; it raises :class:`Blocked` (turned into the
DeletionBlocked condition and a retry) while pods still use the volume or workers still run.
Only objects that are provably this Dataset's are removed (:class:`.owned.Owned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datahoard import names
from datahoard.api import Dataset

from . import snapshots
from .cleanup_job import cleanup_job
from .config import OperatorSettings
from .kube import Kube
from .labels import COMPONENT_LABEL, DATASET_LABEL, worker_selector
from .owned import Owned, volume_name
from .reconcile import parse
from .volumes import node_label_patch


@dataclass
class Blocked(Exception):
    """Deletion must wait; ``message`` says for what (it goes into a condition)."""

    reason: str
    message: str


def finalize(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> None:
    """Remove everything a Dataset made, once no pod uses its volume (blocking API calls).

    1. wait while pods still mount the PVC; 2. delete PVC and PV; 3. unlabel nodes; 4. delete
    the workers and wait for their pods to exit; 5. start a cleanup Job on every node that held
    a cache; 6. delete the Secret copy. Raises :class:`Blocked` while it has to wait.
    """
    meta = body["metadata"]
    ds, _ = parse(body, settings)
    if ds is None:
        # An invalid spec still owns (possibly) everything below; identity is all we need.
        ds = Dataset.model_construct(namespace=meta["namespace"], name=meta["name"],
                                     uid=meta.get("uid", ""), generation=meta.get("generation", 0))
    users = kube.pods_using_claim(ds.namespace, ds.name)
    if users:
        shown = ", ".join(users[:10]) + (" ..." if len(users) > 10 else "")
        raise Blocked("VolumeInUse", f"waiting for {len(users)} pod(s) using PVC "
                      f"{ds.namespace}/{ds.name} to finish: {shown}")
    owned = Owned(ds, kube)
    # Only objects carrying this Dataset's uid (or made for it by a 0.1.x operator) are removed;
    # a same-named object of another tenant stays exactly as it is.
    pv = volume_name(ds, kube)
    owned.delete("PersistentVolumeClaim", ds.name, ds.namespace, quiet=True)
    owned.delete("PersistentVolume", pv, None, legacy=names.legacy_pv_name(ds.namespace, ds.name),
                 quiet=True)
    for node in kube.nodes_with_label(names.node_label(ds.namespace, ds.name)):
        kube.patch_node(node, node_label_patch(ds, False))
    workers = names.worker_name(ds.namespace, ds.name)
    legacy = names.legacy_worker_name(ds.namespace, ds.name)
    owned.delete("DaemonSet", workers, settings.namespace, quiet=True)
    owned.delete("DaemonSet", legacy, settings.namespace, legacy=legacy, quiet=True)
    pods = kube.list_pods(settings.namespace, worker_selector(ds)) + kube.list_pods(
        settings.namespace, f"{DATASET_LABEL}={legacy},{COMPONENT_LABEL}=cache-worker")
    if pods:
        raise Blocked("WorkersStopping", f"waiting for {len(pods)} cache worker pod(s) to exit "
                      "before removing the cache directories")
    cache_nodes = set((body.get("status") or {}).get("cacheNodes") or [])
    for node in sorted(cache_nodes):
        kube.create(cleanup_job(ds, node, settings))
    owned.delete("Secret", workers, settings.namespace, quiet=True)
    owned.delete("Secret", legacy, settings.namespace, legacy=legacy, quiet=True)
    owned.delete("ConfigMap", snapshots.config_map_name(ds), settings.namespace, quiet=True)
    owned.delete("NetworkPolicy", snapshots.peer_policy_name(ds), settings.namespace, quiet=True)
