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

from .consumers import node_consumers
from .failures import worker_failure


@dataclass(frozen=True)
class WorkerPod:
    """What the operator needs from one worker pod."""

    name: str
    node: str
    ip: str | None
    running: bool
    ready: bool
    #: Why the worker does not come up, from its container status (None: nothing says so).
    failure: str | None = None

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
            failure=None if ready else worker_failure(pod),
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


#: Figures a node entry carries; a node whose worker does not answer keeps its last ones.
FIGURES = ("files", "totalBytes", "cachedBytes", "capacityBytes", "hits", "misses", "servedBytes",
           "servedFromCacheBytes", "recentServedBytes", "recentFromCacheBytes", "serving", "warming",
           "counterBase", "lastSeen", "snapshot", "consumers")
#: Lifetime counters: they only grow. A worker that reports less than it did lost its counts
#: (a new cache directory, an old worker without saved counters); the old counts become a base.
COUNTERS = ("servedBytes", "servedFromCacheBytes", "hits", "misses")


def format_duration(seconds: float) -> str:
    """``4m10s``, ``2h5m``, ``3d4h``: short enough for a printer column."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


#: Warming stops once the cache is this full (cache_worker/warm.py): it never evicts its own work.
WARM_FILL = 0.98


def capacity_bound(st: WorkerStats) -> bool:
    """Warming finished without every file because the cache is smaller than the dataset."""
    w = st.warming
    return (w.state == "done" and w.files_done < w.files_total
            and st.capacity_bytes * WARM_FILL < st.total_bytes)


def warming_entry(st: WorkerStats) -> dict[str, Any]:
    """One node's warming: how far, how fast, how long still (from the worker's own figures)."""
    w = st.warming
    out: dict[str, Any] = {"state": w.state, "bytesDone": w.bytes_done, "bytesTotal": w.bytes_total,
                           "percentage": f"{100.0 * w.fraction:.1f}%",
                           "bytesPerSecond": int(w.bytes_per_second)}
    if capacity_bound(st):
        out["state"] = "capacity"
    if w.state == "running" and w.bytes_per_second > 0:
        out["etaSeconds"] = int((w.bytes_total - w.bytes_done) / w.bytes_per_second)
    if w.message:
        out["message"] = w.message
    return out


def _fresh_figures(st: WorkerStats, old: Mapping[str, Any], now: str) -> dict[str, Any]:
    raw = {"servedBytes": st.served_bytes, "servedFromCacheBytes": st.served_from_cache_bytes,
           "hits": st.hits, "misses": st.misses}
    base = {k: int((old.get("counterBase") or {}).get(k, 0)) for k in COUNTERS}
    if all(k in old for k in COUNTERS):
        before = {k: int(old[k]) - base[k] for k in COUNTERS}
        if any(raw[k] < before[k] for k in COUNTERS):
            base = {k: base[k] + before[k] for k in COUNTERS}
    out: dict[str, Any] = {k: raw[k] + base[k] for k in COUNTERS}
    if any(base.values()):
        out["counterBase"] = base
    out.update(files=st.files, totalBytes=st.total_bytes, cachedBytes=st.cached_bytes,
               capacityBytes=st.capacity_bytes, recentServedBytes=st.recent.served_bytes,
               recentFromCacheBytes=st.recent.served_from_cache_bytes, serving=st.serving,
               warming=warming_entry(st), lastSeen=now)
    if st.snapshot:
        out["snapshot"] = st.snapshot
    if st.consumers:
        out["consumers"] = node_consumers(st)
    return out


def _ratio(part: int, whole: int) -> str | None:
    # Nothing read: no ratio rather than a misleading 0.000.
    return f"{part / whole:.3f}" if whole else None


def summarize(ds: Dataset, selected: list[str], pods: list[WorkerPod],
              stats: Mapping[str, WorkerStats | str], old: Mapping[str, Any], now: str
              ) -> dict[str, Any]:
    """Sizes, ratios, warming, per-node entries and phase for ``status`` (conditions are separate).

    ``stats`` maps node name to the worker's stats, or to an error text when the fetch failed.
    Every selected node contributes its current figures or, when its worker does not answer
    now, the last ones it reported (its entry then says ``stale: true`` and since when,
    ``lastSeen``): so a timeout on one node never moves the totals, it only marks them.
    ``cachedBytes`` is the least-filled node's (what a pod can count on wherever it lands);
    ``hitRatio`` is bytes served from cache over bytes served across all nodes, over their
    lifetime; ``recentHitRatio`` the same over the workers' last 10 minutes. ``readyNodes``
    counts the selected nodes whose worker is ready *and* answered now.
    """
    by_node = {p.node: p for p in pods}
    good = {n: s for n, s in stats.items() if isinstance(s, WorkerStats)}
    old_nodes = {e.get("name"): e for e in old.get("nodes") or []}

    nodes = []
    for node in sorted(set(selected) | set(by_node)):
        pod = by_node.get(node)
        entry: dict[str, Any] = {"name": node, "ready": bool(pod and pod.ready)}
        prev = old_nodes.get(node) or {}
        st = good.get(node)
        if st is not None:
            entry.update(_fresh_figures(st, prev, now), stale=False)
        elif prev.get("lastSeen"):
            entry.update({k: prev[k] for k in FIGURES if k in prev}, stale=True)
        nodes.append(entry)

    current = [n for n in nodes if n["ready"] and n["name"] in selected and n.get("stale") is False]
    known = [n for n in nodes if n["name"] in selected and n.get("lastSeen")]
    out: dict[str, Any] = {"nodes": nodes, "readyNodes": f"{len(current)}/{len(selected)}",
                           "stale": bool(known) and not current}
    if known:
        def values(key: str) -> list[Any]:
            return [n[key] for n in known if key in n]

        files, total, cached = values("files"), values("totalBytes"), values("cachedBytes")
        if files and total:
            out.update(files=max(files), totalBytes=max(total), totalSize=format_bytes(max(total)))
        if cached and total:
            least, size = min(cached), max(total)
            out.update(cachedBytes=least, cachedPercentage=(
                f"{100.0 * min(least, size) / size:.1f}%" if size else "100.0%"))
        out["hitRatio"] = _ratio(sum(values("servedFromCacheBytes")), sum(values("servedBytes")))
        out["recentHitRatio"] = _ratio(sum(values("recentFromCacheBytes")), sum(values("recentServedBytes")))
        # None removes the field (status is merge-patched), e.g. after a switch to OnDemand.
        out["warming"] = (overall_warming([n for n in known if "warming" in n]) or None
                          if ds.spec.warm.policy == "Eager" else None)
    out["phase"] = phase(ds, selected, by_node, stats, old_nodes)
    return out


def overall_warming(nodes: list[Mapping[str, Any]]) -> dict[str, Any]:
    """All nodes together: bytes warmed over bytes to warm, the source traffic they draw now
    (the sum of the rates of the nodes warming and answering), and when the last one is done."""
    if not nodes:
        return {}
    warms = [n["warming"] for n in nodes]
    done = sum(int(w.get("bytesDone", 0)) for w in warms)
    total = sum(int(w.get("bytesTotal", 0)) for w in warms)
    running = [w for n, w in zip(nodes, warms) if w.get("state") in ("idle", "running") and not n.get("stale")]
    rate = sum(int(w.get("bytesPerSecond", 0)) for w in running)
    # etaSeconds is always present (None removes it): status is merge-patched, and an old ETA
    # must not outlive the warming it described.
    out: dict[str, Any] = {"percentage": f"{100.0 * done / total:.1f}%" if total else "100.0%",
                           "bytesPerSecond": rate, "rate": f"{format_bytes(rate)}/s",
                           "etaSeconds": None}
    if running:
        etas = [w.get("etaSeconds") for w in running]
        if all(e is not None for e in etas):
            out["etaSeconds"] = max(etas)
            out["eta"] = format_duration(max(etas))
        else:
            out["eta"] = "unknown"  # a node has not fetched anything yet
    elif any(w.get("state") == "capacity" for w in warms):
        out["eta"] = "capacity"  # stopped at the cache capacity: never complete
    elif any(w.get("state") in ("failed", "stopped") for w in warms):
        out["eta"] = "stopped"
    elif any(n.get("stale") for n in nodes):
        out["eta"] = "unknown"
    else:
        out["eta"] = "done"
    return out


def stale_nodes(nodes: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(node, last seen) of every entry kept from an earlier collection."""
    return [(n["name"], n.get("lastSeen", "?")) for n in nodes if n.get("stale")]


def capacity_problem(ds: Dataset, stats: Mapping[str, WorkerStats | str]) -> str | None:
    """Why Eager warming cannot complete on some node, worded for the Cached condition."""
    bound = sorted(n for n, s in stats.items() if isinstance(s, WorkerStats) and capacity_bound(s))
    if not bound or ds.spec.warm.policy != "Eager":
        return None
    st = stats[bound[0]]
    assert isinstance(st, WorkerStats)
    held = 100.0 * st.capacity_bytes * WARM_FILL / st.total_bytes
    need = format_bytes(int(st.total_bytes / WARM_FILL) + 1)
    return (f"capacity {ds.spec.cache.capacity} holds {held:.0f}% of the dataset "
            f"({format_bytes(st.total_bytes)}): warming stopped at the capacity on {', '.join(bound)}; "
            f"the rest is read from the source on every miss. Raise spec.cache.capacity to at "
            f"least {need} to cache it all")


def phase(ds: Dataset, selected: list[str], pods: Mapping[str, WorkerPod],
          stats: Mapping[str, WorkerStats | str], old_nodes: Mapping[str, Any]) -> str:
    """Pending -> Listing -> Warming -> Ready, or Degraded when something that worked broke (or
    an Eager Dataset does not fit its cache, or a worker fails while others serve), or Failed
    while every worker there is fails (a source it cannot list, a credential the store refuses:
    WorkersReady says why). Failed is not for good: the next pass after a worker gets up moves
    it on. Shown as Listing instead, a crash-looping Dataset looked busy, not broken."""
    ready = [n for n in selected if n in pods and pods[n].ready]
    # A node whose worker answered before (it has a lastSeen) and is not ready now: lost.
    lost = [n for n in selected if n not in ready and (old_nodes.get(n) or {}).get("lastSeen")]
    present = [n for n in selected if n in pods]
    failing = [n for n in present if pods[n].failure]
    if not ready:
        if present and len(failing) == len(present):
            return "Failed"
        if lost or failing:
            return "Degraded"
        return "Listing" if any(pods[n].running for n in present) else "Pending"
    good = {n: s for n, s in stats.items() if isinstance(s, WorkerStats)}
    if lost or failing or len(good) < len(ready) or any(s.degraded for s in good.values()) or any(
            s.warming.state == "failed" for s in good.values()):
        return "Degraded"
    if len(ready) < len(selected) or any(not s.ready for s in good.values()):
        return "Listing"
    if ds.spec.warm.policy == "Eager" and any(s.warming.state in ("idle", "running")
                                              for s in good.values()):
        return "Warming"
    if ds.spec.warm.policy == "Eager" and any(capacity_bound(s) for s in good.values()):
        # Eager asks for the whole dataset on every node; it does not fit. Not Ready-as-if-
        # complete: Degraded, and the Cached condition says by how much.
        return "Degraded"
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
