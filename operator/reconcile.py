"""The operator's reconcile pass for one Dataset: parse, refuse, converge, collect, assemble status.

Level-triggered on purpose: :func:`reconcile` looks at the whole current state (nodes, Secret,
worker pods, labels, volumes) every time and fixes whatever differs, so it is the same code
after a create, a spec change, a node joining, a worker restart or an operator restart, and it
is safe to run any number of times. The fixing is :mod:`.converge`; this module runs it, collects
the workers' stats and turns everything into the ``status`` to write (the stats, snapshot and
WorkersReady conditions). Tearing down is :mod:`.finalize`. The handlers call both; :mod:`.kube`
does the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pydantic

from datahoard.api import Dataset, error_summary

from . import metrics, policy, refresh, snapshots
from .collect import collect
from .conditions import CACHED, SPEC_VALID, STATS_CURRENT, WORKERS_READY, Conditions
from .config import OperatorSettings
from .consumers import consumers_status
from .converge import converge, stop_workers
from .kube import Kube
from .owned import Owned
from .status import WorkerPod, capacity_problem, degraded_reasons, stale_nodes, summarize


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
    out["consumers"] = consumers_status(stats, out["nodes"])
    stats_conditions(ds, state.conditions, out, stats, settings.namespace)
    annotation = ((body.get("metadata") or {}).get("annotations") or {}).get(refresh.ANNOTATION)
    await asyncio.to_thread(snapshot_step, ds, status, on_selected, stats, out, state.conditions, kube, settings,
                            annotation)

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
                  out: dict[str, Any], conds: Conditions, kube: Kube, settings: OperatorSettings,
                  annotation: str | None = None) -> None:
    """status.snapshot and SnapshotShared (operator/snapshots.py), status.refresh and Refreshed
    (operator/refresh.py; decided first, so that a refreshed snapshot is the one the plan keeps)."""
    step = refresh.step(ds.spec.source.refresh, annotation, status.get("refresh"), status.get("snapshot"), pods,
                        stats, conds.time)
    plan, cond = snapshots.apply(ds, status, pods, stats, out["nodes"], conds.time, kube, Owned(ds, kube),
                                 settings, step)
    out["snapshot"] = plan.snapshot  # None removes it (merge patch)
    out["snapshotUnheldSince"] = plan.unheld_since
    # A merge patch keeps keys it does not name: name the ones this pass dropped (the token).
    old = status.get("refresh") or {}
    out["refresh"] = None if step.status is None else {**{k: None for k in old if k not in step.status},
                                                       **step.status}
    if cond is not None:
        conds.set(snapshots.SNAPSHOT_SHARED, *cond)
    if step.condition is not None:
        conds.set(refresh.REFRESHED, *step.condition)
    else:
        conds.items = [c for c in conds.items if c.get("type") != refresh.REFRESHED]
