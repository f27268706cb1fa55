"""The operator's logic: converge the cluster towards one Dataset, and tear it down again.

Level-triggered on purpose: :func:`reconcile` looks at the whole current state (nodes, Secret,
worker pods, labels, volumes) every time and fixes whatever differs, so it is the same code
after a create, a spec change, a node joining, a worker restart or an operator restart, and it
is safe to run any number of times. The handlers call it; :mod:`.kube` does the I/O.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from datahoard import names
from datahoard.api import Dataset, error_summary

from . import builders, placement
from .collect import collect
from .config import OperatorSettings
from .kube import Kube
from .status import WorkerPod, degraded_reasons, set_condition, summarize

#: Condition types, in the order a person reads them.
SPEC_VALID = "SpecValid"
NODES_SELECTED = "NodesSelected"
CREDENTIALS_READY = "CredentialsReady"
WORKERS_READY = "WorkersReady"
VOLUME_READY = "VolumeReady"
DELETION_BLOCKED = "DeletionBlocked"
RECONCILED = "Reconciled"
#: Condition reasons that need a person: they also become Warning Events (once, on change).
#: Others (waiting for a worker, workers still starting) are normal progress.
PROBLEMS = {"InvalidSpec", "NoMatchingNodes", "SecretNotFound", "SecretKeyMissing", "Degraded",
            "APIError"}


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


def failed_status(body: Mapping[str, Any], message: str) -> dict[str, Any]:
    meta = body["metadata"]
    conds = Conditions(list((body.get("status") or {}).get("conditions") or []),
                       meta.get("generation", 0))
    conds.set(SPEC_VALID, False, "InvalidSpec", message)
    return {"phase": "Failed", "observedGeneration": meta.get("generation", 0),
            "conditions": conds.items}


@dataclass
class Converged:
    """What :func:`converge` saw and did, for the status step."""

    selected: list[str]
    pods: list[WorkerPod]
    conditions: Conditions
    cache_nodes: list[str]


def _credentials(ds: Dataset, kube: Kube, settings: OperatorSettings, conds: Conditions
                 ) -> str | bool | None:
    """Copy the Secret. Its hash: copied; None: none needed; False: a problem (in a condition)."""
    ref = ds.spec.source.secret_ref
    copy_name = names.worker_name(ds.namespace, ds.name)
    if ref is None:
        kube.delete("Secret", copy_name, settings.namespace)
        conds.set(CREDENTIALS_READY, True, "NoSecretRef",
                  "no spec.source.secretRef: anonymous access or the node's cloud identity")
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
    keep = keys.all
    copied = {k: v for k, v in data.items() if k in keep}
    kube.apply(builders.secret_copy(ds, copied, settings))
    conds.set(CREDENTIALS_READY, True, "SecretCopied",
              f"Secret {ds.namespace}/{ref.name} copied to {settings.namespace}/{copy_name}")
    return builders.credentials_hash(copied)


def converge(ds: Dataset, status: Mapping[str, Any], nodes: list[Mapping[str, Any]], kube: Kube,
             settings: OperatorSettings) -> Converged:
    """Make the workers, labels and volumes match the spec (blocking API calls).

    1. pick nodes; 2. copy credentials; 3. apply the worker DaemonSet (or remove it when no
    node matches); 4. label exactly the nodes whose worker is Ready; 5. once a worker is
    Ready, create the PV and the PVC bound to it.
    """
    conds = Conditions(list(status.get("conditions") or []), ds.generation)
    conds.set(SPEC_VALID, True, "Valid", "the spec is valid")
    cache_nodes = set(status.get("cacheNodes") or [])
    tolerations = builders.worker_tolerations(ds, settings)

    selected = placement.pick_nodes(nodes, ds, settings.gpu_resource, tolerations,
                                    current=cache_nodes)
    if selected:
        shown = ", ".join(selected[:10]) + (f" and {len(selected) - 10} more" if len(selected) > 10 else "")
        conds.set(NODES_SELECTED, True, "NodesSelected", f"{len(selected)} node(s): {shown}")
    else:
        conds.set(NODES_SELECTED, False, "NoMatchingNodes",
                  placement.describe_selection(ds, settings.gpu_resource))

    creds = _credentials(ds, kube, settings, conds)
    ds_name = builders.dataset_key(ds)
    if not selected:
        # Caches stay on the nodes' disks in case they come back; only the workers go.
        kube.delete("DaemonSet", ds_name, settings.namespace)
    elif creds is not False:
        kube.apply(builders.worker_daemonset(ds, selected, settings, credentials=creds or None))
        cache_nodes |= set(selected)

    pods = [WorkerPod.from_pod(p) for p in kube.list_pods(settings.namespace, worker_selector(ds))]
    ready = {p.node for p in pods if p.ready and p.node in selected}
    label = names.node_label(ds.namespace, ds.name)
    labelled = set(kube.nodes_with_label(label))
    for node in sorted(ready - labelled):
        kube.patch_node(node, builders.node_label_patch(ds, True))
    for node in sorted(labelled - ready):
        kube.patch_node(node, builders.node_label_patch(ds, False))

    pv = names.pv_name(ds.namespace, ds.name)
    if ready:
        kube.create(builders.persistent_volume(ds, settings))
        kube.create(builders.persistent_volume_claim(ds))
        conds.set(VOLUME_READY, True, "Bound",
                  f"PVC {ds.namespace}/{ds.name} is bound to PV {pv}; pods using it run on the "
                  f"{len(ready)} ready cache node(s)")
    elif not kube.exists("PersistentVolume", pv):
        conds.set(VOLUME_READY, False, "WaitingForWorker",
                  f"PVC {ds.namespace}/{ds.name} is created once a cache worker is ready")
    return Converged(selected, pods, conds, sorted(cache_nodes))


async def reconcile(body: Mapping[str, Any], nodes: list[Mapping[str, Any]], kube: Kube,
                    settings: OperatorSettings) -> dict[str, Any]:
    """One full pass for one Dataset; returns the ``status`` to merge-patch.

    ``nodes`` is the current Node list (from the operator's watch-fed index, so that many
    Datasets do not each list every node every pass).
    """
    ds, problem = parse(body, settings)
    if ds is None:
        return failed_status(body, problem)
    status = body.get("status") or {}
    state = await asyncio.to_thread(converge, ds, status, nodes, kube, settings)
    on_selected = [p for p in state.pods if p.node in state.selected]
    stats = await collect(on_selected, settings.stats_port, settings.stats_timeout,
                          settings.stats_concurrency)
    out = summarize(ds, state.selected, on_selected, stats, status, state.conditions.time)

    not_ready = [n for n in state.selected if not any(p.node == n and p.ready for p in on_selected)]
    problems = degraded_reasons(stats) + [f"{n}: worker not ready" for n in not_ready]
    if state.selected and not problems:
        state.conditions.set(WORKERS_READY, True, "AllReady",
                             f"{len(state.selected)}/{len(state.selected)} cache workers ready")
    elif state.selected:
        state.conditions.set(WORKERS_READY, False, "Degraded" if out["phase"] == "Degraded"
                             else "NotReady", "; ".join(problems[:10]))
    out.update(observedGeneration=ds.generation, cacheNodes=state.cache_nodes,
               conditions=state.conditions.items)
    return out


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
    kube.delete("PersistentVolumeClaim", ds.name, ds.namespace)
    kube.delete("PersistentVolume", names.pv_name(ds.namespace, ds.name))
    for node in kube.nodes_with_label(names.node_label(ds.namespace, ds.name)):
        kube.patch_node(node, builders.node_label_patch(ds, False))
    kube.delete("DaemonSet", builders.dataset_key(ds), settings.namespace)
    pods = kube.list_pods(settings.namespace, worker_selector(ds))
    if pods:
        raise Blocked("WorkersStopping", f"waiting for {len(pods)} cache worker pod(s) to exit "
                      "before removing the cache directories")
    cache_nodes = set((body.get("status") or {}).get("cacheNodes") or [])
    for node in sorted(cache_nodes):
        kube.create(builders.cleanup_job(ds, node, settings))
    kube.delete("Secret", names.worker_name(ds.namespace, ds.name), settings.namespace)
