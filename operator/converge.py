"""Converge: make a Dataset's workers, node labels, credentials copy and volume match its spec.

The level-triggered core of a reconcile pass (:mod:`.reconcile` runs it in a thread, then
collects stats and assembles the status): it looks at the whole current state every time and
fixes whatever differs, so it is safe to run any number of times. :func:`stop_workers` is the
same for a Dataset this installation refuses. Blocking API calls through :mod:`.kube`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datahoard import names
from datahoard.api import Dataset

from . import placement
from .conditions import (CREDENTIALS_READY, NODES_SELECTED, OBJECTS_OWNED, SPEC_VALID, VOLUME_READY,
                         Conditions)
from .config import OperatorSettings
from .credentials import credentials_hash, secret_copy, secret_keys
from .kube import Kube
from .labels import dataset_key, worker_selector
from .owned import Owned, volume_name
from .status import WorkerPod
from .volumes import node_label_patch, persistent_volume, persistent_volume_claim
from .workers import worker_daemonset, worker_tolerations


@dataclass
class Converged:
    """What :func:`converge` saw and did, for the status step."""

    selected: list[str]
    pods: list[WorkerPod]
    conditions: Conditions
    cache_nodes: list[str]


def _credentials(ds: Dataset, kube: Kube, settings: OperatorSettings, conds: Conditions,
                 owned: Owned) -> str | bool | None:
    """Copy the Secret. Its hash: copied; None: none needed; False: a problem (in a condition)."""
    ref = ds.spec.source.secret_ref
    copy_name = names.worker_name(ds.namespace, ds.name)
    if ref is None:
        owned.delete("Secret", copy_name, settings.namespace)
        if ds.spec.source.credentials_mode == "NodeIdentity":
            conds.set(CREDENTIALS_READY, True, "NodeIdentity",
                      "credentials NodeIdentity: the node's or the worker ServiceAccount's cloud "
                      "identity (allowed by this installation)")
        else:
            conds.set(CREDENTIALS_READY, True, "Anonymous",
                      "credentials Anonymous: unsigned requests, no credential lookup (set "
                      "spec.source.secretRef for a private source)")
        return None
    data = kube.read_secret_data(ds.namespace, ref.name)
    keys = secret_keys(ds)
    wanted = " and ".join(keys.required) or " or ".join(keys.any_of)
    if data is None:
        conds.set(CREDENTIALS_READY, False, "SecretNotFound",
                  f"Secret {ds.namespace}/{ref.name} not found: create it with {wanted} "
                  "(see examples/s3-secret.yaml)")
        return False
    missing = [k for k in keys.required if not data.get(k)]
    if keys.any_of and not any(data.get(k) for k in keys.any_of):
        missing.append(" or ".join(keys.any_of))
    if missing:
        conds.set(CREDENTIALS_READY, False, "SecretKeyMissing",
                  f"Secret {ds.namespace}/{ref.name} has no {' and no '.join(missing)}: add "
                  f"{'it' if len(missing) == 1 else 'them'} to the Secret")
        return False
    ok, _ = owned.mine("Secret", copy_name, settings.namespace)
    if not ok:
        conds.set(CREDENTIALS_READY, False, "NameConflict",
                  f"the Secret copy {settings.namespace}/{copy_name} belongs to someone else "
                  "(see ObjectsOwned)")
        return False
    keep = keys.all
    copied = {k: v for k, v in data.items() if k in keep}
    kube.apply(secret_copy(ds, copied, settings))
    conds.set(CREDENTIALS_READY, True, "SecretCopied",
              f"Secret {ds.namespace}/{ref.name} copied to {settings.namespace}/{copy_name}")
    return credentials_hash(copied)


def _retire_legacy_workers(ds: Dataset, owned: Owned, settings: OperatorSettings) -> None:
    """Upgrade from 0.1.x: its DaemonSet and Secret copy had names that could collide; the ones
    this Dataset provably made are removed, so that only the new-named workers mount its view."""
    old = names.legacy_worker_name(ds.namespace, ds.name)
    if old != names.worker_name(ds.namespace, ds.name):
        for kind in ("DaemonSet", "Secret"):
            owned.delete(kind, old, settings.namespace, legacy=old, quiet=True)


def _volume(ds: Dataset, kube: Kube, settings: OperatorSettings, owned: Owned) -> str | None:
    """Create the PV and the PVC bound to it; the PV's name, or None when one is not ours."""
    pv = volume_name(ds, kube)
    if pv == names.pv_name(ds.namespace, ds.name) and not kube.create(
            persistent_volume(ds, settings)):
        # 409: it existed; create is atomic, so this check cannot race with another creator.
        ok, _ = owned.mine("PersistentVolume", pv, None)
        if not ok:
            return None
    if not kube.create(persistent_volume_claim(ds, pv)):
        ok, _ = owned.mine("PersistentVolumeClaim", ds.name, ds.namespace)
        if not ok:
            return None
    return pv


def converge(ds: Dataset, status: Mapping[str, Any], nodes: list[Mapping[str, Any]], kube: Kube,
             settings: OperatorSettings) -> Converged:
    """Make the workers, labels and volumes match the spec (blocking API calls).

    1. pick nodes; 2. copy credentials; 3. apply the worker DaemonSet (or remove it when no
    node matches); 4. label the nodes whose worker is Ready, unlabel those no longer selected; 5. once a worker is
    Ready, create the PV and the PVC bound to it. Every named object is checked to be this
    Dataset's before it is written or deleted (:class:`Owned`); conflicts go to ObjectsOwned.
    """
    conds = Conditions(list(status.get("conditions") or []), ds.generation)
    conds.set(SPEC_VALID, True, "Valid", "the spec is valid")
    cache_nodes = set(status.get("cacheNodes") or [])
    tolerations = worker_tolerations(ds, settings)
    owned = Owned(ds, kube)
    node_policy = node_policy_of(settings)

    selected = placement.pick_nodes(nodes, ds, settings.gpu_resource, tolerations,
                                    current=cache_nodes, policy=node_policy)
    kept_out = placement.refused(nodes, ds, settings.gpu_resource, tolerations, node_policy)
    also = (f"; kept out by this installation's policy: {'; '.join(kept_out[:5])}"
            if kept_out else "")
    if selected:
        shown = ", ".join(selected[:10]) + (f" and {len(selected) - 10} more" if len(selected) > 10 else "")
        conds.set(NODES_SELECTED, True, "NodesSelected", f"{len(selected)} node(s): {shown}{also}")
    elif kept_out:
        conds.set(NODES_SELECTED, False, "PlacementForbidden",
                  f"every node the spec matches is kept out by this installation's policy: "
                  f"{'; '.join(kept_out[:10])}")
    else:
        conds.set(NODES_SELECTED, False, "NoMatchingNodes",
                  placement.describe_selection(ds, settings.gpu_resource))

    _retire_legacy_workers(ds, owned, settings)
    creds = _credentials(ds, kube, settings, conds, owned)
    ds_name = dataset_key(ds)
    if not selected:
        # Caches stay on the nodes' disks in case they come back; only the workers go.
        owned.delete("DaemonSet", ds_name, settings.namespace)
    elif creds is not False and owned.mine("DaemonSet", ds_name, settings.namespace)[0]:
        kube.apply(worker_daemonset(ds, selected, settings, credentials=creds or None))
        cache_nodes |= set(selected)

    pods = [WorkerPod.from_pod(p) for p in kube.list_pods(settings.namespace, worker_selector(ds))]
    ready = {p.node for p in pods if p.ready and p.node in selected}
    label = names.node_label(ds.namespace, ds.name)
    labelled = set(kube.nodes_with_label(label))
    for node in sorted(ready - labelled):
        kube.patch_node(node, node_label_patch(ds, True))
    # A labelled node stays labelled while it is selected, even while its worker is not ready: a
    # restarting worker resumes the held FUSE connection (attach.py) and keeps its cache, so new
    # pods are sent there and wait in NodePublishVolume instead of staying Pending.
    for node in sorted(labelled - set(selected)):
        kube.patch_node(node, node_label_patch(ds, False))

    if ready:
        pv = _volume(ds, kube, settings, owned)
        if pv is not None:
            conds.set(VOLUME_READY, True, "Bound",
                      f"PVC {ds.namespace}/{ds.name} is bound to PV {pv}; pods using it run on "
                      f"the {len(ready)} ready cache node(s)")
        else:
            conds.set(VOLUME_READY, False, "NameConflict",
                      "the volume's name belongs to someone else (see ObjectsOwned)")
    elif kube.read("PersistentVolume", volume_name(ds, kube)) is None:
        conds.set(VOLUME_READY, False, "WaitingForWorker",
                  f"PVC {ds.namespace}/{ds.name} is created once a cache worker is ready")
    _ownership_condition(conds, owned)
    return Converged(selected, pods, conds, sorted(cache_nodes))


def _ownership_condition(conds: Conditions, owned: Owned) -> None:
    if owned.conflicts:
        conds.set(OBJECTS_OWNED, False, "NameConflict", "; ".join(owned.conflicts[:5]))
    else:
        conds.set(OBJECTS_OWNED, True, "Owned",
                  "every object this Dataset uses carries its uid")


def node_policy_of(settings: OperatorSettings) -> placement.NodePolicy:
    return placement.NodePolicy(forbidden_labels=tuple(settings.forbidden_node_labels),
                                forbidden_taints=tuple(settings.forbidden_taints),
                                capacity_resource=settings.capacity_resource)


def stop_workers(ds: Dataset, kube: Kube, settings: OperatorSettings) -> None:
    """A Dataset this installation refuses keeps no workers, node labels or credential copy
    (e.g. after the admin forbade what it uses); its volume and caches stay for a fixed spec."""
    owned = Owned(ds, kube)
    owned.delete("DaemonSet", dataset_key(ds), settings.namespace, quiet=True)
    for node in kube.nodes_with_label(names.node_label(ds.namespace, ds.name)):
        kube.patch_node(node, node_label_patch(ds, False))
    owned.delete("Secret", names.worker_name(ds.namespace, ds.name), settings.namespace, quiet=True)
