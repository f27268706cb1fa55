"""Growing datasets (issue 15, part 2): when a Dataset lists its source again, and how every node
moves to the new snapshot. Pure decisions on plain data; :func:`.reconcile.snapshot_step` wires
them to the ConfigMap and pods (through :mod:`.snapshots`) and the handlers post the Events.

Opt in with ``spec.source.refresh`` (absent: one snapshot forever). A refresh is **due** when
the ``datahoard.io/refresh`` annotation has a value other than the last one handled
(``status.refresh.requested``), or ``interval`` has passed since the last refresh ended (or since
refresh was first seen on, for the first one); and no refresh is in progress, and a ready worker
serves ``status.snapshot`` (it lists, and it will hand the new snapshot out). A Dataset created
with the annotation already set gets one refresh after its first snapshot (no change, usually).

The walk, one state per pass in ``status.refresh.state``:

* **Listing**: the lister (the first ready worker by node name that serves ``status.snapshot``)
  is named in the snapshot ConfigMap (``DATAHOARD_REFRESH_LISTER``) with a fresh
  ``DATAHOARD_REFRESH_TOKEN``, and its pod is deleted. The DaemonSet's new pod reads both at
  container start (with ``NODE_NAME`` from the downward API), lists the source afresh and reports
  ``refresh.token``/``refresh.state`` in its stats. Restarting a worker rather than calling it
  keeps the operator out of a worker's loopback-only refresh endpoint, and the token makes the
  request idempotent: a worker that restarts again does not list again.
* **done, same id**: nothing changed in the source: back to Idle ("no change").
  **done, new id**: ``status.snapshot`` and the ConfigMap's id become it, with the lister as the
  only peer; :mod:`.snapshots` restarts every other worker (they report the old id) and each new
  container fetches the snapshot from the lister and moves its cache to it keeping node ids, so
  the CSI plugin's FUSE connection resumes (readers wait for the restart, they do not fail).
  State **Applying** until every ready worker that answers reports the new id, then Idle.
* **failed** (the lister refuses: the listing failed, or is empty under a prefix; it keeps
  serving the old snapshot): state **Failed** with the worker's message. The next annotation
  value or interval tries again.

Bounded waits: a lister that does not report within :data:`LIST_TIMEOUT`, or workers that have
not all moved within :data:`APPLY_TIMEOUT`, end the refresh as Failed with a message naming who.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datahoard import names
from datahoard.api import Refresh, format_bytes
from datahoard.stats import WorkerStats

from .status import WorkerPod, format_duration

ANNOTATION = f"{names.GROUP}/refresh"
LISTER_KEY = "DATAHOARD_REFRESH_LISTER"
TOKEN_KEY = "DATAHOARD_REFRESH_TOKEN"
#: The condition type that says how the last refresh went (absent while refresh is off).
REFRESHED = "Refreshed"
IDLE, LISTING, APPLYING, FAILED = "Idle", "Listing", "Applying", "Failed"
#: Seconds a lister has to restart, list the source and report. A million objects take about
#: 4 minutes to list through a 10 ms link (244 ms per 1000-key page) plus about 40 s to write
#: the snapshot and build the index (bench/ANALYSIS.md, "snapshot"): ten minutes leave twice
#: that, and a worker image that ignores the request (older than the refresh contract) is
#: noticed the same hour.
LIST_TIMEOUT = 600.0
#: Seconds for every other worker to restart onto the new snapshot: a fetch from the lister and
#: an index build each, 26 s for a million objects on the loaded 2-core bench machine; past it
#: the refresh is Failed, naming who did not move (the snapshot plan keeps restarting them).
APPLY_TIMEOUT = 1800.0
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _seconds(since: str, now: str) -> float:
    parse = lambda t: datetime.datetime.strptime(t, TIME_FORMAT)  # noqa: E731
    return (parse(now) - parse(since)).total_seconds()


def _after(since: str, seconds: float) -> str:
    return (datetime.datetime.strptime(since, TIME_FORMAT)
            + datetime.timedelta(seconds=seconds)).strftime(TIME_FORMAT)


@dataclass(frozen=True)
class Step:
    """What one reconcile does about refreshing."""

    #: status.refresh to write (None removes it).
    status: dict[str, Any] | None
    #: The Dataset's snapshot from this pass on (the new id once the lister reports one).
    snapshot: str | None
    #: Keys the snapshot ConfigMap carries besides the id and peers (the lister and token).
    config: dict[str, str] = field(default_factory=dict)
    #: Pods to delete once the ConfigMap says what they are to do (the lister's).
    restart: list[WorkerPod] = field(default_factory=list)
    #: The Refreshed condition (ok, reason, message); None: remove it.
    condition: tuple[bool, str, str] | None = None


def _counts(st: WorkerStats) -> dict[str, int]:
    r = st.refresh
    return {"addedFiles": r.added_files, "changedFiles": r.changed_files, "removedFiles": r.removed_files,
            "addedBytes": r.added_bytes}


def change_summary(r: Mapping[str, Any]) -> str:
    return (f"{r.get('addedFiles', 0)} file(s) added ({format_bytes(int(r.get('addedBytes', 0)))}), "
            f"{r.get('changedFiles', 0)} changed, {r.get('removedFiles', 0)} removed")


def schedule(spec: Refresh) -> str:
    how = f"every {spec.interval} and " if spec.interval else ""
    return f"{how}on demand (set or change the {ANNOTATION} annotation)"


def condition(spec: Refresh | None, annotation: str | None, r: Mapping[str, Any] | None
              ) -> tuple[bool, str, str] | None:
    """Refreshed, from status.refresh alone (level, not edge)."""
    if spec is None:
        if annotation is None:
            return None
        return (False, "RefreshOff", f"the {ANNOTATION} annotation asks for a refresh, but refresh is off for "
                "this Dataset: set spec.source.refresh ({} for on demand only, or {interval: 30m}) to list "
                "the source again")
    if not r:
        return (True, "Waiting", f"refresh is on ({schedule(spec)}); waiting for the first snapshot")
    state = r.get("state")
    if state == LISTING:
        return (False, "Listing", f"listing the source again on node {r.get('lister')} since {r.get('requestedAt')}")
    if state == APPLYING:
        return (False, "Applying", f"moving every node to snapshot {str(r.get('snapshot'))[:12]} "
                f"({change_summary(r)}), listed on {r.get('lister')}")
    if state == FAILED:
        return (False, "RefreshFailed", f"{r.get('message')} (at {r.get('lastRefreshAt')}); the previous "
                f"snapshot is still served; refresh: {schedule(spec)}")
    nxt = next_due(spec, r)
    when = f"; next by interval at {nxt}" if nxt else ""
    if r.get("lastRefreshAt"):
        return (True, "Refreshed", f"{r.get('message')} (at {r.get('lastRefreshAt')}); refresh: {schedule(spec)}"
                + when)
    return (True, "NotYet", f"serving the snapshot listed at first; refresh: {schedule(spec)}{when}")


def _ended(r: dict[str, Any], state: str, now: str, message: str) -> dict[str, Any]:
    out = {**r, "state": state, "lastRefreshAt": now, "message": message}
    out.pop("token", None)
    return out


def _listing(r: dict[str, Any], snapshot: str, pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str],
             now: str) -> tuple[dict[str, Any], str]:
    """(status.refresh, the Dataset's snapshot) for a pass while the lister lists."""
    lister, token = r.get("lister"), r.get("token")
    st = stats.get(lister or "")
    if isinstance(st, WorkerStats) and st.refresh.token == token and token:
        new = st.refresh.snapshot or st.snapshot
        if st.refresh.state == "failed":
            why = st.refresh.message or "the worker gave no reason (see its log)"
            return _ended(r, FAILED, now, f"the listing on {lister} failed: {why}"), snapshot
        if st.refresh.state == "done" and new:
            counts = _counts(st)
            if new == snapshot:
                return _ended({**r, **counts}, IDLE, now,
                              f"no change: the source lists as snapshot {snapshot[:12]} still"), snapshot
            out = {**r, **counts, "state": APPLYING, "snapshot": new, "listedAt": now,
                   "message": f"listed snapshot {new[:12]} on {lister}: {change_summary(counts)}"}
            out.pop("token", None)
            return out, new
    waited = _seconds(r.get("requestedAt") or now, now)
    if waited >= LIST_TIMEOUT:
        pod = next((p.name for p in pods if p.node == lister), None)
        where = f"kubectl logs -n <workers' namespace> {pod}" if pod else "its worker pod's log"
        return _ended(r, FAILED, now, (
            f"node {lister}'s worker did not report the refresh within {format_duration(LIST_TIMEOUT)} of "
            f"the request (it restarts to list; a worker image older than the refresh contract ignores "
            f"the request): see {where}")), snapshot
    return r, snapshot


def _applying(r: dict[str, Any], snapshot: str, pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str],
              now: str) -> dict[str, Any]:
    ready = {p.node for p in pods if p.ready}
    behind = sorted(n for n in ready if not isinstance(stats.get(n), WorkerStats)
                    or (stats[n].snapshot is not None and stats[n].snapshot != snapshot))  # type: ignore[union-attr]
    if not behind:
        return _ended(r, IDLE, now, f"every ready node serves snapshot {snapshot[:12]}: {change_summary(r)}")
    if _seconds(r.get("listedAt") or now, now) >= APPLY_TIMEOUT:
        return _ended(r, FAILED, now, (
            f"snapshot {snapshot[:12]} was listed but {', '.join(behind[:10])} did not move to it within "
            f"{format_duration(APPLY_TIMEOUT)} (see SnapshotShared and WorkersReady; they keep being restarted "
            "onto it)"))
    return r


def _lister(snapshot: str, pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str]) -> WorkerPod | None:
    """The first ready worker, by node name, that serves ``snapshot``."""
    for p in sorted(pods, key=lambda p: p.node):
        st = stats.get(p.node)
        if p.ready and isinstance(st, WorkerStats) and st.snapshot == snapshot:
            return p
    return None


def due(spec: Refresh, annotation: str | None, r: Mapping[str, Any], now: str) -> str | None:
    """Why a refresh is due now (for the Event), or None. ``r`` is an Idle or Failed refresh."""
    if annotation is not None and annotation != r.get("requested"):
        return f"the {ANNOTATION} annotation is {annotation!r}"
    interval = spec.interval_seconds()
    base = r.get("lastRefreshAt") or r.get("since")
    if interval and base and _seconds(base, now) >= interval:
        return f"every {spec.interval} (last at {base})"
    return None


def token_for(snapshot: str, annotation: str | None, r: Mapping[str, Any]) -> str:
    """The request's token: new for every refresh (the base time moves when one ends), and the
    same when a pass runs again on a status that does not show its own start yet (kopf's timer
    can see the object before its last patch comes back): then the ConfigMap already holds it
    and the lister is not restarted twice (:func:`.snapshots.apply`)."""
    base = f"{snapshot}|{annotation}|{r.get('lastRefreshAt') or r.get('since')}"
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def step(spec: Refresh | None, annotation: str | None, current: Mapping[str, Any] | None, snapshot: str | None,
         pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str], now: str) -> Step:
    """One pass. ``current`` is status.refresh, ``snapshot`` status.snapshot (before this pass),
    ``pods``/``stats`` the selected nodes' workers and ``now`` a :data:`TIME_FORMAT` timestamp."""
    if spec is None:  # off: forget any walk (the snapshot plan still moves nodes to status.snapshot)
        return Step(None, snapshot, condition=condition(None, annotation, None))
    if not snapshot:
        return Step(dict(current) if current else None, snapshot, condition=condition(spec, annotation, None))
    r: dict[str, Any] = dict(current or {})
    r.setdefault("state", IDLE)
    r.setdefault("since", now)
    out = Step(r, snapshot)
    if r["state"] == LISTING:
        r, new = _listing(r, snapshot, pods, stats, now)
        config = {LISTER_KEY: r["lister"], TOKEN_KEY: r["token"]} if r["state"] == LISTING else {}
        out = Step(r, new, config)
    elif r["state"] == APPLYING:
        out = Step(_applying(r, snapshot, pods, stats, now), snapshot)
    else:
        why = due(spec, annotation, r, now)
        lister = _lister(snapshot, pods, stats) if why else None
        if why and lister is not None:
            token = token_for(snapshot, annotation, r)
            r = {**{k: v for k, v in r.items() if k in ("since", "lastRefreshAt", "requested")},
                 "state": LISTING, "token": token, "lister": lister.node, "requestedAt": now, "from": snapshot,
                 "reason": why}
            if annotation is not None and annotation != (current or {}).get("requested"):
                r["requested"] = annotation
            out = Step(r, snapshot, {LISTER_KEY: lister.node, TOKEN_KEY: token}, [lister])
    return Step(out.status, out.snapshot, out.config, out.restart, condition(spec, annotation, out.status))


def events(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events for a change of status.refresh, once per refresh."""
    old, new = old or {}, new or {}
    state, was = new.get("state"), old.get("state")
    started = state == LISTING and (was != LISTING or old.get("token") != new.get("token"))
    if started:
        return [("Normal", "Refreshing", f"listing the source again on node {new.get('lister')} "
                 f"({new.get('reason')})")]
    if state == IDLE and was in (LISTING, APPLYING):
        return [("Normal", "Refreshed", str(new.get("message")))]
    if state == FAILED and (was != FAILED or old.get("lastRefreshAt") != new.get("lastRefreshAt")):
        return [("Warning", "RefreshFailed", str(new.get("message")))]
    return []


def next_due(spec: Refresh, r: Mapping[str, Any]) -> str | None:
    """When the interval makes the next refresh due (None: on demand only, or not known yet)."""
    base = r.get("lastRefreshAt") or r.get("since")
    interval = spec.interval_seconds()
    return _after(base, interval) if interval and base else None
