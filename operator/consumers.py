"""``status.consumers``: the pods that read the most through a Dataset, all nodes together.

Each worker reports served bytes per consumer (its top 20 by bytes and an ``other`` sum,
cache_worker/consumers.py); the operator adds them up by (namespace, pod) over the workers that
answered this collection and keeps the top :data:`TOP` by bytes. ``other`` is not a consumer and
is left out (it mixes different pods on different nodes). A worker that does not answer keeps
its last-known contribution, as every other figure does (operator/status.py): each node entry
carries that node's own top :data:`TOP` (``consumers``), and a stale node's are added in place of
its stats, so a timeout on one node never makes a pod's bytes drop.

Workers save per-consumer counts with their other counters, so a restart continues them; a
new cache directory (a ``Memory`` cache's tmpfs goes with its pod) starts them afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datahoard.stats import WorkerStats

#: Consumers shown in status.
TOP = 5
OTHER = "other"


def node_consumers(st: WorkerStats) -> list[dict[str, Any]]:
    """A node's own top :data:`TOP`, kept in its status entry (``nodes[].consumers``)."""
    ranked = sorted((c for c in st.consumers if not (c.pod == OTHER and not c.namespace)),
                    key=lambda c: (-c.served_bytes, c.namespace, c.pod))[:TOP]
    return [{"namespace": c.namespace, "pod": c.pod, "cacheBytes": c.served_from_cache_bytes,
             "bytes": c.served_bytes} for c in ranked]


def consumers_status(stats: Mapping[str, WorkerStats | str], nodes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The top :data:`TOP` consumers by bytes, each ``{namespace, pod, bytes, hitRatio}``, over the
    workers that answered and the last-known lists of stale nodes (``nodes``: status.nodes)."""
    totals: dict[tuple[str, str], list[int]] = {}

    def add(ns: str, pod: str, cache: int, served: int) -> None:
        sums = totals.setdefault((ns, pod), [0, 0])
        sums[0] += cache
        sums[1] += served

    for st in stats.values():
        if isinstance(st, WorkerStats):
            for c in st.consumers:
                if not (c.pod == OTHER and not c.namespace):
                    add(c.namespace, c.pod, c.served_from_cache_bytes, c.served_bytes)
    for entry in nodes:
        if entry.get("stale") and not isinstance(stats.get(entry.get("name")), WorkerStats):
            for c in entry.get("consumers") or []:
                add(c.get("namespace", ""), c.get("pod", ""), int(c.get("cacheBytes", 0)), int(c.get("bytes", 0)))
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], item[0]))[:TOP]
    return [{"namespace": ns, "pod": pod, "bytes": served,
             "hitRatio": f"{cache / served:.3f}"}
            for (ns, pod), (cache, served) in ranked if served]
