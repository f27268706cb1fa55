"""Which nodes cache a Dataset: a pure function of the Node objects and the spec.

Default: nodes with allocatable GPUs (training runs there, so the cache must be there too).
With ``placement.nodeSelector``: nodes with those labels instead. Either way a node must be able
to run the worker (schedulable, every NoSchedule/NoExecute taint tolerated), and with
``maxNodes`` the nodes already caching the Dataset are kept first, so a spec change does not
throw away warm caches.

The installation also bounds placement, whatever the spec asks (:class:`NodePolicy`, from the
chart's values): nodes with a forbidden label or taint (control-plane nodes by default) never
run a privileged worker, and a node whose allocatable storage (memory for Memory caches) is
smaller than the cache capacity is not picked. :func:`refused` says which nodes the spec
matched but the policy kept out, for the NodesSelected condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datahoard.api import Dataset, format_bytes, quantity_bytes

Node = Mapping[str, Any]


def _positive(quantity: str | int | None) -> bool:
    if quantity is None:
        return False
    try:
        return quantity_bytes(str(quantity)) > 0
    except ValueError:
        return False


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """The core scheduler's rule for one taint (v1 Toleration.ToleratesTaint)."""
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        operator = tol.get("operator") or "Equal"
        if operator == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


@dataclass(frozen=True)
class NodePolicy:
    """Where this installation lets workers go (operator settings)."""

    forbidden_labels: tuple[str, ...] = ()
    forbidden_taints: tuple[str, ...] = ()
    #: Allocatable resource bounding a Disk cache ("" = none); Memory caches use "memory".
    capacity_resource: str = ""


def _bytes(quantity: Any) -> int | None:
    """Bytes of a node quantity (``"100Gi"``, ``"107374182400"``, ``"500M"``), or None."""
    if quantity is None:
        return None
    try:
        return quantity_bytes(str(quantity))
    except ValueError:
        return None


def policy_refusal(node: Node, ds: Dataset, policy: NodePolicy) -> str | None:
    """Why the installation keeps a worker of ``ds`` off ``node``, or None."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    for key in policy.forbidden_labels:
        if key in labels:
            return f"{meta.get('name')}: label {key} (no workers on such nodes here)"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") in policy.forbidden_taints:
            return f"{meta.get('name')}: taint {taint.get('key')} (no workers on such nodes here)"
    resource = "memory" if ds.spec.cache.medium == "Memory" else policy.capacity_resource
    if resource:
        has = _bytes(((node.get("status") or {}).get("allocatable") or {}).get(resource))
        if has is not None and has < ds.spec.cache.capacity_bytes:
            return (f"{meta.get('name')}: allocatable {resource} {format_bytes(has)} < "
                    f"spec.cache.capacity {ds.spec.cache.capacity}")
    return None


def eligible(node: Node, ds: Dataset, gpu_resource: str,
             tolerations: list[Mapping[str, Any]]) -> bool:
    """Whether the spec (selector, GPUs, tolerations) picks ``node``, before any policy."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    if meta.get("deletionTimestamp") or spec.get("unschedulable"):
        return False
    selector = ds.spec.placement.node_selector
    if selector:
        node_labels = meta.get("labels") or {}
        if any(node_labels.get(k) != v for k, v in selector.items()):
            return False
    elif not _positive(((node.get("status") or {}).get("allocatable") or {}).get(gpu_resource)):
        return False
    return all(tolerates(tolerations, taint) for taint in spec.get("taints") or []
               if taint.get("effect") in ("NoSchedule", "NoExecute"))


def refused(nodes: Iterable[Node], ds: Dataset, gpu_resource: str,
            tolerations: list[Mapping[str, Any]], policy: NodePolicy) -> list[str]:
    """Why each node the spec picks is kept out by the installation's policy, sorted."""
    out = []
    for node in nodes:
        if eligible(node, ds, gpu_resource, tolerations):
            why = policy_refusal(node, ds, policy)
            if why:
                out.append(why)
    return sorted(out)


def pick_nodes(nodes: Iterable[Node], ds: Dataset, gpu_resource: str,
               tolerations: list[Mapping[str, Any]], current: Iterable[str] = (),
               policy: NodePolicy = NodePolicy()) -> list[str]:
    """Names of the nodes that should run a worker, sorted; current ones first under maxNodes."""
    names = sorted(n["metadata"]["name"] for n in nodes
                   if eligible(n, ds, gpu_resource, tolerations)
                   and policy_refusal(n, ds, policy) is None)
    limit = ds.spec.placement.max_nodes
    if not limit or len(names) <= limit:
        return names
    keep = [n for n in names if n in set(current)]
    rest = [n for n in names if n not in set(current)]
    return sorted((keep + rest)[:limit])


def describe_selection(ds: Dataset, gpu_resource: str) -> str:
    """What a person should check when no node matched."""
    selector = ds.spec.placement.node_selector
    if selector:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return (f"no schedulable node has the labels {wanted} (and tolerable taints); "
                "fix spec.placement.nodeSelector or label nodes")
    return (f"no schedulable node has allocatable {gpu_resource}; set "
            "spec.placement.nodeSelector to cache on other nodes, or add tolerations for their taints")
