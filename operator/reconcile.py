"""The operator's logic: converge the cluster towards one Dataset, and tear it down again.

Level-triggered on purpose: :func:`reconcile` looks at the whole current state (nodes, Secret,
worker pods, labels, volumes) every time and fixes whatever differs, so it is the same code
after a create, a spec change, a node joining, a worker restart or an operator restart, and it
is safe to run any number of times. The handlers call it; :mod:`.kube` does the I/O.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from datahoard import names
from datahoard.api import Dataset, error_summary

from . import builders, metrics, ownership, placement, policy, snapshots
from .collect import collect
from .consumers import consumers_status
from .config import OperatorSettings
from .kube import Kube
from .status import WorkerPod, capacity_problem, degraded_reasons, set_condition, stale_nodes, summarize

#: Condition types, in the order a person reads them.
SPEC_VALID = "SpecValid"
NODES_SELECTED = "NodesSelected"
CREDENTIALS_READY = "CredentialsReady"
WORKERS_READY = "WorkersReady"
VOLUME_READY = "VolumeReady"
OBJECTS_OWNED = "ObjectsOwned"
DELETION_BLOCKED = "DeletionBlocked"
RECONCILED = "Reconciled"
STATS_CURRENT = "StatsCurrent"
CACHED = "Cached"
#: Condition reasons that need a person: they also become Warning Events (once, on change).
#: Others (waiting for a worker, workers still starting) are normal progress.
PROBLEMS = {"InvalidSpec", "NoMatchingNodes", "SecretNotFound", "SecretKeyMissing", "Degraded",
            "APIError", "NameConflict", "NodeIdentityForbidden", "EndpointForbidden",
            "NamespaceNotServed", "PlacementForbidden", "StaleStats", "AllStale", "CapacityBound",
            "WorkerFailing"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Conditions:
    """Accumulates condition changes against the stored list, for one reconcile."""

    items: list[dict[str, Any]]
    generation: int
    time: str = field(default_factory=now)

    def set(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.items = set_condition(self.items, type_, ok, reason, message, self.generation, self.time)


def worker_selector(ds: Dataset) -> str:
    return f"{builders.DATASET_LABEL}={builders.dataset_key(ds)},{builders.COMPONENT_LABEL}=cache-worker"


def parse(body: Mapping[str, Any], settings: OperatorSettings) -> tuple[Dataset | None, str]:
    """The Dataset, or None and a message a person can act on."""
    try:
        ds = Dataset.from_body(body)
    except pydantic.ValidationError as exc:
        return None, f"invalid spec: {error_summary(exc)}"
    if ds.spec.source.scheme not in settings.source_schemes:
        supported = ", ".join(f"{s}://" for s in settings.source_schemes)
        return None, (f"spec.source.uri: {ds.spec.source.scheme}:// sources are not supported by "
                      f"this installation's cache workers (supported: {supported}); use one of "
                      "those or upgrade Datahoard")
    return ds, ""


def failed_status(body: Mapping[str, Any], message: str, reason: str = "InvalidSpec"
                  ) -> dict[str, Any]:
    meta = body["metadata"]
    conds = Conditions(list((body.get("status") or {}).get("conditions") or []),
                       meta.get("generation", 0))
    conds.set(SPEC_VALID, False, reason, message)
    return {"phase": "Failed", "observedGeneration": meta.get("generation", 0),
            "conditions": conds.items}


@dataclass
class Converged:
    """What :func:`converge` saw and did, for the status step."""

    selected: list[str]
    pods: list[WorkerPod]
    conditions: Conditions
    cache_nodes: list[str]


class Owned:
    """Ownership checks for one pass: every write and delete of a named object goes through
    :meth:`mine` first, and every refusal is remembered for the ObjectsOwned condition."""

    def __init__(self, ds: Dataset, kube: Kube) -> None:
        self.ds, self.kube = ds, kube
        self.conflicts: list[str] = []

    def mine(self, kind: str, name: str, namespace: str | None, legacy: str | None = None
             ) -> tuple[bool, dict[str, Any] | None]:
        """(may we write ``name``, the object as it is now or None). A foreign object is
        recorded as a conflict and must be left alone."""
        obj = self.kube.read(kind, name, namespace)
        if obj is None or ownership.verdict(obj, self.ds, legacy) != "foreign":
            return True, obj
        self.conflicts.append(ownership.conflict_message(obj, self.ds))
        return False, obj

    def delete(self, kind: str, name: str, namespace: str | None, legacy: str | None = None,
               quiet: bool = False) -> bool:
        """Delete ``name`` only if it is ours (or legacy-ours at ``legacy``), pinned to its uid.
        ``quiet``: a foreign object here is no conflict (a legacy name someone else holds)."""
        obj = self.kube.read(kind, name, namespace)
        if obj is None:
            return True
        if ownership.verdict(obj, self.ds, legacy) == "foreign":
            if not quiet:
                self.conflicts.append(ownership.conflict_message(obj, self.ds))
            return False
        self.kube.delete(kind, name, namespace, uid=obj["metadata"].get("uid"))
        return True


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
    keys = builders.secret_keys(ds)
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
    kube.apply(builders.secret_copy(ds, copied, settings))
    conds.set(CREDENTIALS_READY, True, "SecretCopied",
              f"Secret {ds.namespace}/{ref.name} copied to {settings.namespace}/{copy_name}")
    return builders.credentials_hash(copied)


def _retire_legacy_workers(ds: Dataset, owned: Owned, settings: OperatorSettings) -> None:
    """Upgrade from 0.1.x: its DaemonSet and Secret copy had names that could collide; the ones
    this Dataset provably made are removed, so that only the new-named workers mount its view."""
    old = names.legacy_worker_name(ds.namespace, ds.name)
    if old != names.worker_name(ds.namespace, ds.name):
        for kind in ("DaemonSet", "Secret"):
            owned.delete(kind, old, settings.namespace, legacy=old, quiet=True)


def volume_name(ds: Dataset, kube: Kube) -> str:
    """The PV this Dataset's PVC uses: the new name, or the 0.1.x one a PVC of this Dataset is
    already bound to (a PVC's volumeName is immutable, so upgrades keep it until deletion)."""
    pvc = kube.read("PersistentVolumeClaim", ds.name, ds.namespace)
    legacy = names.legacy_pv_name(ds.namespace, ds.name)
    if pvc is not None and ownership.verdict(pvc, ds) == "ours" and (
            (pvc.get("spec") or {}).get("volumeName") == legacy):
        pv = kube.read("PersistentVolume", legacy)
        if pv is not None and ownership.verdict(pv, ds, legacy) != "foreign":
            return legacy
    return names.pv_name(ds.namespace, ds.name)


def _volume(ds: Dataset, kube: Kube, settings: OperatorSettings, owned: Owned) -> str | None:
    """Create the PV and the PVC bound to it; the PV's name, or None when one is not ours."""
    pv = volume_name(ds, kube)
    if pv == names.pv_name(ds.namespace, ds.name) and not kube.create(
            builders.persistent_volume(ds, settings)):
        # 409: it existed; create is atomic, so this check cannot race with another creator.
        ok, _ = owned.mine("PersistentVolume", pv, None)
        if not ok:
            return None
    if not kube.create(builders.persistent_volume_claim(ds, pv)):
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
    tolerations = builders.worker_tolerations(ds, settings)
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
    ds_name = builders.dataset_key(ds)
    if not selected:
        # Caches stay on the nodes' disks in case they come back; only the workers go.
        owned.delete("DaemonSet", ds_name, settings.namespace)
    elif creds is not False and owned.mine("DaemonSet", ds_name, settings.namespace)[0]:
        kube.apply(builders.worker_daemonset(ds, selected, settings, credentials=creds or None))
        cache_nodes |= set(selected)

    pods = [WorkerPod.from_pod(p) for p in kube.list_pods(settings.namespace, worker_selector(ds))]
    ready = {p.node for p in pods if p.ready and p.node in selected}
    label = names.node_label(ds.namespace, ds.name)
    labelled = set(kube.nodes_with_label(label))
    for node in sorted(ready - labelled):
        kube.patch_node(node, builders.node_label_patch(ds, True))
    # A labelled node stays labelled while it is selected, even while its worker is not ready: a
    # restarting worker resumes the held FUSE connection (attach.py) and keeps its cache, so new
    # pods are sent there and wait in NodePublishVolume instead of staying Pending.
    for node in sorted(labelled - set(selected)):
        kube.patch_node(node, builders.node_label_patch(ds, False))

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
    owned.delete("DaemonSet", builders.dataset_key(ds), settings.namespace, quiet=True)
    for node in kube.nodes_with_label(names.node_label(ds.namespace, ds.name)):
        kube.patch_node(node, builders.node_label_patch(ds, False))
    owned.delete("Secret", names.worker_name(ds.namespace, ds.name), settings.namespace, quiet=True)


async def reconcile(body: Mapping[str, Any], nodes: list[Mapping[str, Any]], kube: Kube,
                    settings: OperatorSettings) -> dict[str, Any]:
    """One full pass for one Dataset; returns the ``status`` to merge-patch.

    ``nodes`` is the current Node list (from the operator's watch-fed index, so that many
    Datasets do not each list every node every pass).
    """
    ds, problem = parse(body, settings)
    if ds is None:
        return failed_status(body, problem)
    refusal = await asyncio.to_thread(policy.check, ds, settings)
    if refusal is not None:
        await asyncio.to_thread(stop_workers, ds, kube, settings)
        return failed_status(body, refusal.message, refusal.reason)
    status = body.get("status") or {}
    state = await asyncio.to_thread(converge, ds, status, nodes, kube, settings)
    on_selected = [p for p in state.pods if p.node in state.selected]
    started = time.monotonic()
    stats = await collect(on_selected, settings.stats_port, settings.stats_timeout,
                          settings.stats_concurrency)
    metrics.STATS_SECONDS.observe(time.monotonic() - started)
    metrics.STATS_FAILURES.inc(sum(isinstance(s, str) for s in stats.values()))
    out = summarize(ds, state.selected, on_selected, stats, status, state.conditions.time)
    out["consumers"] = consumers_status(stats, status)
    stats_conditions(ds, state.conditions, out, stats, settings.namespace)
    await asyncio.to_thread(snapshot_step, ds, status, on_selected, stats, out, state.conditions, kube, settings)

    not_ready = [n for n in state.selected if not any(p.node == n and p.ready for p in on_selected)]
    # A worker that exited says why (its termination message): that, not "not ready".
    failing = {p.node: p.failure for p in on_selected if p.failure and p.node in not_ready}
    problems = degraded_reasons(stats) + [f"{n}: {failing.get(n) or 'worker not ready'}"
                                          for n in not_ready]
    if state.selected and not problems:
        state.conditions.set(WORKERS_READY, True, "AllReady",
                             f"{len(state.selected)}/{len(state.selected)} cache workers ready")
    elif state.selected:
        reason = ("WorkerFailing" if failing else "Degraded" if out["phase"] == "Degraded"
                  else "NotReady")
        state.conditions.set(WORKERS_READY, False, reason, "; ".join(problems[:10]))
    out.update(observedGeneration=ds.generation, cacheNodes=state.cache_nodes,
               conditions=state.conditions.items)
    return out


def stats_conditions(ds: Dataset, conds: Conditions, out: Mapping[str, Any],
                      stats: Mapping[str, Any], workers_namespace: str) -> None:
    """StatsCurrent: which nodes' figures are old, and since when. Cached: an Eager Dataset
    that does not fit its cache (warming stopped at the capacity)."""
    stale = stale_nodes(out["nodes"])
    if out.get("stale"):
        seen = max(t for _, t in stale)
        conds.set(STATS_CURRENT, False, "AllStale",
                  f"no cache worker answered: every figure is as last seen at {seen} (phase "
                  "and numbers are not current; check the worker pods in "
                  f"{workers_namespace})")
    elif stale:
        shown = ", ".join(f"{n} since {t}" for n, t in stale[:10])
        conds.set(STATS_CURRENT, False, "StaleStats",
                  f"no stats from {shown}: their last known figures are kept in the totals "
                  "(see WorkersReady for why)")
    elif out["nodes"]:
        fresh = sum(1 for n in out["nodes"] if n.get("stale") is False)
        waiting = len(out["nodes"]) - fresh
        conds.set(STATS_CURRENT, True, "Current",
                  f"{fresh} cache worker(s) answered the last collection" + (
                      f"; {waiting} never answered yet (see WorkersReady)" if waiting else ""))
    problem = capacity_problem(ds, stats)
    if problem:
        conds.set(CACHED, False, "CapacityBound", problem)
    elif ds.spec.warm.policy == "Eager" and any(s for s in stats.values() if not isinstance(s, str)):
        conds.set(CACHED, True, "Fits", f"the dataset fits the cache capacity {ds.spec.cache.capacity}")


def snapshot_step(ds: Dataset, status: Mapping[str, Any], pods: list[WorkerPod], stats: Mapping[str, Any],
                  out: dict[str, Any], conds: Conditions, kube: Kube, settings: OperatorSettings) -> None:
    """status.snapshot and SnapshotShared (operator/snapshots.py)."""
    plan, cond = snapshots.apply(ds, status, pods, stats, out["nodes"], conds.time, kube, Owned(ds, kube),
                                 settings)
    out["snapshot"] = plan.snapshot  # None removes it (merge patch)
    out["snapshotUnheldSince"] = plan.unheld_since
    if cond is not None:
        conds.set(snapshots.SNAPSHOT_SHARED, *cond)


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
        kube.patch_node(node, builders.node_label_patch(ds, False))
    workers = names.worker_name(ds.namespace, ds.name)
    legacy = names.legacy_worker_name(ds.namespace, ds.name)
    owned.delete("DaemonSet", workers, settings.namespace, quiet=True)
    owned.delete("DaemonSet", legacy, settings.namespace, legacy=legacy, quiet=True)
    pods = kube.list_pods(settings.namespace, worker_selector(ds)) + kube.list_pods(
        settings.namespace, f"{builders.DATASET_LABEL}={legacy},{builders.COMPONENT_LABEL}=cache-worker")
    if pods:
        raise Blocked("WorkersStopping", f"waiting for {len(pods)} cache worker pod(s) to exit "
                      "before removing the cache directories")
    cache_nodes = set((body.get("status") or {}).get("cacheNodes") or [])
    for node in sorted(cache_nodes):
        kube.create(builders.cleanup_job(ds, node, settings))
    owned.delete("Secret", workers, settings.namespace, quiet=True)
    owned.delete("Secret", legacy, settings.namespace, legacy=legacy, quiet=True)
    owned.delete("ConfigMap", snapshots.config_map_name(ds), settings.namespace, quiet=True)
    owned.delete("NetworkPolicy", snapshots.peer_policy_name(ds), settings.namespace, quiet=True)
