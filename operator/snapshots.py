"""One listing snapshot per Dataset, for every node (issue 15).

A worker lists the source into a snapshot named by its content hash (cache_worker/snapshot.py)
and reports the id in its stats. The operator records the first id reported in
``status.snapshot``; from then on it is the Dataset's snapshot:

* A ConfigMap in the workers' namespace, named like the worker DaemonSet, holds it
  (``DATAHOARD_SNAPSHOT_ID``) and the stats URLs of ready workers that serve it
  (``DATAHOARD_SNAPSHOT_FROM``). The worker container reads both through optional
  ``configMapKeyRef`` env vars, which the kubelet resolves at every container start: a node that
  joins later, or a worker that restarts, fetches the snapshot from a peer instead of listing
  the bucket, and the pod template never changes (no rollout when peers come and go; a pod's
  IP changes with every new pod, so peer URLs in the template would go stale).
* A worker that listed concurrently and got another id (the bucket changed between two
  listings) is restarted onto the chosen snapshot: its pod is deleted, the DaemonSet makes a
  new one, which starts with the ConfigMap's id. Until it reports the chosen id the
  ``SnapshotShared`` condition is False and names it. Workers that report no id (older images)
  are left alone.
* If no worker is ready (so none can hand the snapshot out) for :data:`FORGET_AFTER` seconds in
  a row (``status.snapshotUnheldSince`` says since when), the snapshot is forgotten: every cache
  may be lost (``medium: Memory`` after a full restart) and the workers then fail, unable to
  fetch it. status.snapshot and the ConfigMap are cleared, the next worker lists afresh and its
  id becomes the snapshot. A worker restart (seconds) does not forget it, even on one node.

Where the chart's NetworkPolicy admits only the operator, the CSI plugin and scrapers to a
worker's stats port, a NetworkPolicy per Dataset (``<worker DaemonSet>-peers``, with
``peer_network_policy``) adds its own workers: a worker can fetch its Dataset's snapshot from a
peer, never another Dataset's (the endpoint names a tenant's bucket and objects).

A refresh of a growing Dataset (operator/refresh.py) asks one worker to list again through the
same ConfigMap (``DATAHOARD_REFRESH_LISTER``/``DATAHOARD_REFRESH_TOKEN``) and, if the listing
differs, replaces the recorded id; the restarts above then move every other worker to it
(SnapshotShared says ``Refreshing`` meanwhile).

When several workers report ids in the same collection before one is recorded, the id most
nodes serve wins, ties broken by the alphabetically first node (deterministic across operator
restarts).
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datahoard.api import Dataset
from datahoard.stats import WorkerStats

from .config import OperatorSettings
from .labels import COMPONENT_LABEL, DATASET_LABEL, dataset_key, metadata
from .refresh import LISTER_KEY, TOKEN_KEY
from .status import WorkerPod

SNAPSHOT_SHARED = "SnapshotShared"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
ID_KEY = "DATAHOARD_SNAPSHOT_ID"
FROM_KEY = "DATAHOARD_SNAPSHOT_FROM"
#: Peers listed in the ConfigMap; the worker tries them in order.
MAX_PEERS = 5
#: Seconds without a ready worker after which the snapshot is forgotten (module doc).
FORGET_AFTER = 300.0
#: The worker's node (downward API): a refresh request names the node whose worker lists.
NODE_NAME_ENV = "NODE_NAME"


def config_map_name(ds: Dataset) -> str:
    return dataset_key(ds)


def worker_env(ds: Dataset) -> list[dict[str, Any]]:
    """The worker container's env vars that carry the Dataset's snapshot (optional: before
    there is one, or without the ConfigMap, the worker lists the source), and a refresh request
    (operator/refresh.py: the worker whose NODE_NAME is the lister lists afresh, once per token)."""
    name = config_map_name(ds)
    return [{"name": NODE_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}] + [
        {"name": key, "valueFrom": {"configMapKeyRef": {"name": name, "key": key, "optional": True}}}
        for key in (ID_KEY, FROM_KEY, LISTER_KEY, TOKEN_KEY)]


def config_map(ds: Dataset, settings: OperatorSettings, snapshot: str | None, peers: list[str],
               extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``extra``: a refresh request (the lister's node and token) while one is listing."""
    data = {ID_KEY: snapshot, FROM_KEY: ",".join(peers), **(extra or {})} if snapshot else {}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(ds, config_map_name(ds), "cache-worker", settings.namespace),
            "data": data}


def peer_policy_name(ds: Dataset) -> str:
    return f"{dataset_key(ds)}-peers"


def peer_policy(ds: Dataset, settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to this Dataset's workers' stats port from this Dataset's workers (added to what
    the chart's policy admits: NetworkPolicies are a union)."""
    workers = {"matchLabels": {DATASET_LABEL: dataset_key(ds),
                               COMPONENT_LABEL: "cache-worker"}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(ds, peer_policy_name(ds), "cache-worker", settings.namespace),
            "spec": {"podSelector": workers, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": workers}],
                                  "ports": [{"protocol": "TCP", "port": settings.stats_port}]}]}}


def stats_url(pod: WorkerPod, port: int) -> str:
    host = f"[{pod.ip}]" if ":" in (pod.ip or "") else pod.ip
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class Plan:
    """What one reconcile does about the snapshot."""

    snapshot: str | None
    peers: list[str]
    #: (node, the id its worker serves) for workers to restart onto ``snapshot``.
    mismatched: list[tuple[str, str]]
    #: Pods to delete so that they start on ``snapshot``.
    restart: list[WorkerPod]
    #: Since when no worker has been ready to hand ``snapshot`` out (status.snapshotUnheldSince).
    unheld_since: str | None = None


def choose(recorded: str | None, stats: Mapping[str, WorkerStats | str]) -> str | None:
    """The recorded id, else the one most answering workers serve (ties: first node's)."""
    if recorded:
        return recorded
    reported = {node: s.snapshot for node, s in sorted(stats.items())
                if isinstance(s, WorkerStats) and s.snapshot}
    if not reported:
        return None
    counts = Counter(reported.values())
    best = max(counts.values())
    return next(sid for sid in reported.values() if counts[sid] == best)


def _seconds_between(since: str, now: str) -> float:
    parse = lambda t: datetime.datetime.strptime(t, TIME_FORMAT)  # noqa: E731
    return (parse(now) - parse(since)).total_seconds()


def plan(recorded: str | None, pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str],
         port: int, now: str, unheld_since: str | None = None) -> Plan:
    """``now`` and ``unheld_since`` are status timestamps (:data:`TIME_FORMAT`)."""
    chosen = choose(recorded, stats)
    good = {n: s for n, s in stats.items() if isinstance(s, WorkerStats)}
    by_node = {p.node: p for p in pods}
    holders = sorted(n for n, s in good.items() if s.snapshot == chosen and n in by_node and by_node[n].ready)
    since = None
    if chosen and not holders and not any(p.ready for p in pods) and pods:
        since = unheld_since or now
        if _seconds_between(since, now) >= FORGET_AFTER:
            return Plan(None, [], [], [])  # nobody could hand it out for long: forget it
    peers = [stats_url(by_node[n], port) for n in holders if by_node[n].ip][:MAX_PEERS]
    mismatched = sorted((n, s.snapshot) for n, s in good.items()
                        if chosen and s.snapshot and s.snapshot != chosen)
    restart = [by_node[n] for n, _ in mismatched if n in by_node]
    return Plan(chosen, peers, mismatched, restart, since)


def condition(p: Plan, nodes: list[Mapping[str, Any]], refreshed_from: str | None = None
              ) -> tuple[bool, str, str] | None:
    """(ok, reason, message) for SnapshotShared, or None before any worker reported one.
    ``refreshed_from``: the snapshot a refresh is moving the nodes from (operator/refresh.py)."""
    if not p.snapshot:
        return None
    if p.unheld_since:
        return (False, "NoHolder", f"no worker is ready to hand snapshot {p.snapshot[:12]} to new workers "
                f"since {p.unheld_since}; it is forgotten {FORGET_AFTER:g} s after that and the source is "
                "listed again")
    if p.mismatched and refreshed_from and all(sid == refreshed_from for _, sid in p.mismatched):
        shown = ", ".join(n for n, _ in p.mismatched[:10])
        holders = sum(1 for n in nodes if n.get("snapshot") == p.snapshot and n.get("stale") is False)
        return (False, "Refreshing",
                f"moving every node to the refreshed snapshot {p.snapshot[:12]} (was {refreshed_from[:12]}): "
                f"{holders} node(s) serve it; restarting {shown} onto it (readers on "
                f"{'it' if len(p.mismatched) == 1 else 'them'} wait for the restart)")
    if p.mismatched:
        shown = ", ".join(f"{n} serves {sid[:12]}" for n, sid in p.mismatched[:10])
        return (False, "SnapshotMismatch",
                f"not every node serves snapshot {p.snapshot[:12]}: {shown}; restarting "
                f"{'it' if len(p.mismatched) == 1 else 'them'} onto it")
    serving = [n["name"] for n in nodes if n.get("snapshot") == p.snapshot and n.get("stale") is False]
    return (True, "OneSnapshot", f"{len(serving)} node(s) serve snapshot {p.snapshot[:12]}"
            + (f"; peers for nodes that join: {len(p.peers)}" if p.peers else
               "; no ready worker holds it now to hand it to a node that joins"))


def apply(ds: Dataset, status: Mapping[str, Any], pods: list[WorkerPod], stats: Mapping[str, WorkerStats | str],
          nodes: list[Mapping[str, Any]], now: str, kube: Any, owned: Any, settings: OperatorSettings,
          refresh: Any = None) -> tuple[Plan, tuple[bool, str, str] | None]:
    """Record the snapshot, keep the ConfigMap current, restart mismatched workers (blocking
    API calls). Returns the plan and the SnapshotShared condition (None: not yet known).

    ``refresh`` (a :class:`.refresh.Step`): the snapshot to serve from now on, the refresh
    request to put in the ConfigMap, and the lister's pod to restart once it is there."""
    recorded = refresh.snapshot if refresh is not None else status.get("snapshot")
    extra = refresh.config if refresh is not None else {}
    p = plan(recorded, pods, stats, settings.stats_port, now, status.get("snapshotUnheldSince"))
    name = config_map_name(ds)
    mine, current = owned.mine("ConfigMap", name, settings.namespace)
    if not mine:
        return p, (False, "NameConflict", f"the ConfigMap {settings.namespace}/{name} that hands the snapshot "
                   "to new workers belongs to someone else (see ObjectsOwned)")
    have = (current or {}).get("data") or {}
    # Peers are only rewritten when none of the listed ones still serves it: fewer writes.
    listed = [u for u in (have.get(FROM_KEY) or "").split(",") if u]
    keep_peers = have.get(ID_KEY) == p.snapshot and any(u in p.peers for u in listed)
    wanted = config_map(ds, settings, p.snapshot, listed if keep_peers else p.peers, extra)
    if current is None or have != wanted["data"]:
        kube.apply(wanted)
    if settings.peer_network_policy:
        policy = peer_policy(ds, settings)
        ours, existing = owned.mine("NetworkPolicy", peer_policy_name(ds), settings.namespace)
        if ours and (existing is None or (existing.get("spec") or {}).get("ingress") != policy["spec"]["ingress"]):
            kube.apply(policy)
    # The lister is restarted once per request: not again when the ConfigMap held it already.
    new_request = refresh is not None and extra.get(TOKEN_KEY) and have.get(TOKEN_KEY) != extra.get(TOKEN_KEY)
    restart = list(refresh.restart) if new_request and p.snapshot else []
    if p.snapshot and p.peers:  # a restarted worker can fetch it: restart the ones that differ
        restart += [pod for pod in p.restart if pod not in restart]
    for pod in restart:
        kube.delete("Pod", pod.name, settings.namespace)
    refreshing = refresh.status if refresh is not None and refresh.status else {}
    return p, condition(p, nodes, refreshing.get("from") if refreshing.get("state") == "Applying" else None)
