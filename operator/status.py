"""Pure status arithmetic: worker pods and their stats in, the Dataset's ``status`` out.

Kept free of I/O so the rules (which node counts, what "cached" means, when a Dataset is
Degraded) are unit-tested with plain data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datahoard.api import Dataset, format_bytes
from datahoard.stats import WorkerStats


@dataclass(frozen=True)
class WorkerPod:
    """What the operator needs from one worker pod."""

    name: str
    node: str
    ip: str | None
    running: bool
    ready: bool

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> "WorkerPod":
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        return cls(
            name=pod["metadata"]["name"],
            node=(pod.get("spec") or {}).get("nodeName") or "",
            ip=status.get("podIP"),
            running=status.get("phase") == "Running",
            ready=ready and status.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"),
        )


def set_condition(conditions: Iterable[Mapping[str, Any]], type_: str, ok: bool, reason: str,
                  message: str, generation: int, now: str) -> list[dict[str, Any]]:
    """Return ``conditions`` with one entry replaced; the transition time moves only on change."""
    status = "True" if ok else "False"
    out, found = [], False
    for cond in conditions:
        cond = dict(cond)
        if cond.get("type") == type_:
            found = True
            if cond.get("status") != status:
                cond["lastTransitionTime"] = now
            cond.update(status=status, reason=reason, message=message,
                        observedGeneration=generation)
        out.append(cond)
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now, "observedGeneration": generation})
    return out


def summarize(ds: Dataset, selected: list[str], pods: list[WorkerPod],
              stats: Mapping[str, WorkerStats | str], old: Mapping[str, Any], now: str
              ) -> dict[str, Any]:
    """Sizes, ratios, per-node entries and phase for ``status`` (conditions are separate).

    ``stats`` maps node name to the worker's stats, or to an error text when the fetch failed.
    ``cachedBytes`` is the least-filled ready node's (what a pod can count on wherever it
    lands); ``hitRatio`` is bytes served from cache over bytes served, across all nodes.
    """
    by_node = {p.node: p for p in pods}
    good = {n: s for n, s in stats.items() if isinstance(s, WorkerStats)}
    old_nodes = {e.get("name"): e for e in old.get("nodes") or []}

    nodes = []
    for node in sorted(set(selected) | set(by_node)):
        pod = by_node.get(node)
        entry: dict[str, Any] = {"name": node, "ready": bool(pod and pod.ready)}
        st = good.get(node)
        if st is not None:
            entry.update(cachedBytes=st.cached_bytes, hits=st.hits, misses=st.misses, serving=st.serving,
                         lastSeen=now)
        elif node in old_nodes:
            # Keep the last known numbers; lastSeen says how old they are.
            for key in ("cachedBytes", "hits", "misses", "serving", "lastSeen"):
                if key in old_nodes[node]:
                    entry[key] = old_nodes[node][key]
        nodes.append(entry)

    ready = [n for n in nodes if n["ready"] and n["name"] in selected]
    out: dict[str, Any] = {"nodes": nodes, "readyNodes": f"{len(ready)}/{len(selected)}"}
    if good:
        files = max(s.files for s in good.values())
        total = max(s.total_bytes for s in good.values())
        cached = min(s.cached_bytes for s in good.values())
        out.update(files=files, totalBytes=total, totalSize=format_bytes(total),
                   cachedBytes=cached,
                   cachedPercentage=f"{100.0 * min(cached, total) / total:.1f}%" if total else "100.0%")
        served = sum(s.served_bytes for s in good.values())
        from_cache = sum(s.served_from_cache_bytes for s in good.values())
        # Nothing read yet: no ratio rather than a misleading 0.000.
        out["hitRatio"] = f"{from_cache / served:.3f}" if served else None
    out["phase"] = phase(ds, selected, by_node, stats, old_nodes)
    return out


def phase(ds: Dataset, selected: list[str], pods: Mapping[str, WorkerPod],
          stats: Mapping[str, WorkerStats | str], old_nodes: Mapping[str, Any]) -> str:
    """Pending -> Listing -> Warming -> Ready, or Degraded when something that worked broke."""
    ready = [n for n in selected if n in pods and pods[n].ready]
    # A node whose worker answered before (it has a lastSeen) and is not ready now: lost.
    lost = [n for n in selected if n not in ready and (old_nodes.get(n) or {}).get("lastSeen")]
    if not ready:
        if lost:
            return "Degraded"
        return "Listing" if any(pods[n].running for n in selected if n in pods) else "Pending"
    good = {n: s for n, s in stats.items() if isinstance(s, WorkerStats)}
    if lost or len(good) < len(ready) or any(s.degraded for s in good.values()) or any(
            s.warming.state == "failed" for s in good.values()):
        return "Degraded"
    if len(ready) < len(selected) or any(not s.ready for s in good.values()):
        return "Listing"
    if ds.spec.warm.policy == "Eager" and any(s.warming.state in ("idle", "running")
                                              for s in good.values()):
        return "Warming"
    return "Ready"


def degraded_reasons(stats: Mapping[str, WorkerStats | str]) -> list[str]:
    """Readable per-node problems for the WorkersReady condition."""
    out = []
    for node, st in sorted(stats.items()):
        if isinstance(st, str):
            out.append(f"{node}: stats unavailable ({st})")
        elif st.degraded:
            out.append(f"{node}: {st.degraded}")
        elif st.warming.state == "failed":
            out.append(f"{node}: warming failed ({st.last_error or 'see worker log'})")
    return out
