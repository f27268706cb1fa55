"""Which nodes cache a Dataset: a pure function of the Node objects and the spec.

Default: nodes with allocatable GPUs (training runs there, so the cache must be there too).
With ``placement.nodeSelector``: nodes with those labels instead. Either way a node must be able
to run the worker (schedulable, every NoSchedule/NoExecute taint tolerated), and with
``maxNodes`` the nodes already caching the Dataset are kept first, so a spec change does not
throw away warm caches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from datahoard.api import Dataset, quantity_bytes

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


def eligible(node: Node, ds: Dataset, gpu_resource: str,
             tolerations: list[Mapping[str, Any]]) -> bool:
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


def pick_nodes(nodes: Iterable[Node], ds: Dataset, gpu_resource: str,
               tolerations: list[Mapping[str, Any]], current: Iterable[str] = ()) -> list[str]:
    """Names of the nodes that should run a worker, sorted; current ones first under maxNodes."""
    names = sorted(n["metadata"]["name"] for n in nodes if eligible(n, ds, gpu_resource, tolerations))
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
