"""kopf handlers of the warm gate: feed :func:`.gate.decide`, then lift the gate or say why not.

Chosen design: two watch-fed indexes and two event handlers, no timers.

* ``gated_pods`` indexes every pod that carries the ``datahoard.io/warm`` gate under each
  (namespace, claimName) it mounts; ``dataset_index`` keeps every Dataset's spec and status.
* A gated pod is evaluated when it appears or changes (``on.event`` on pods), and again on
  every change of a Dataset it mounts (``on.event`` on Datasets: the status the reconcile timer
  writes, at most every ``DATAHOARD_INTERVAL``; a Node change alone, e.g. a taint lifted, is
  seen at the Dataset's next status change). Work per Dataset event is bounded by the gated
  pods that name that Dataset, each O(its Datasets' nodes); no API call is made unless a gate is
  removed, an Event is posted, or a pod mounts no Dataset at all (then its PVCs are read once
  per evaluation, to tell "no such PVC" from "not a Datahoard volume"). Measured: one decision
  for a Dataset on 1000 cache nodes takes ~4 ms (mostly :func:`.gate.may_land` per node, on this
  2-core machine), so 100 gated pods of such a Dataset cost ~0.4 s of the event loop per status
  change; the loop yields between pods so that other handlers are not held up.
* Not a per-pod kopf timer: kopf puts a finalizer on every object that has a timer, so user
  pods would wait for the operator to be deleted. Neither handler persists anything on the pod:
  the only write is the strategic-merge patch that removes our own gate entry, pinned to the
  pod's uid, so other controllers' gates stay and a same-named replacement pod is untouched.

The operator now watches all pods (kopf filters gated ones client-side; the API has no field
selector for scheduling gates). Events are posted once per change of state per pod (kept in a
bounded in-memory table: an operator restart may repeat one).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from datahoard import names

from . import gate

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)
#: Pods whose last posted state is remembered (uid -> state); the oldest are forgotten first.
POSTED_LIMIT = 10_000
log = logging.getLogger(__name__)


def _is_gated(spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> bool:
    return not meta.get("deletionTimestamp") and gate.gated({"spec": spec})


@kopf.index("v1", "pods", when=_is_gated)
def gated_pods(body: kopf.Body, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Gated pods by (namespace, claim); a pod with no claim under (namespace, "")."""
    view = gate.pod_view(body)
    return {(namespace, claim): view for claim in gate.claims(view) or [""]}


@kopf.index(*RESOURCE)
def dataset_index(body: kopf.Body, namespace: str, name: str, **_: Any
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """What :func:`.gate.decide` needs of every Dataset: identity, spec, status."""
    return {(namespace, name): _dataset_view(body)}


def _dataset_view(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "deletionTimestamp")},
            "spec": gate._plain(body.get("spec") or {}),
            "status": gate._plain(body.get("status") or {})}


class _Nodes(Mapping[str, Any]):
    """The node index as ``{name: Node}``, looked up per name (never copied whole)."""

    def __init__(self, index: kopf.Index) -> None:
        self.index = index

    def __getitem__(self, name: str) -> Any:
        for node in self.index.get(name, ()):
            return node
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def _first(index: kopf.Index, key: Any) -> Any:
    for value in index.get(key, ()):
        return value
    return None


@kopf.on.startup()
def _start(memo: kopf.Memo, **_: Any) -> None:
    # Made here, in the operator-wide memo: kopf gives each object a shallow copy of it, so the
    # table is shared by the pod and the Dataset handlers only when it exists before they run.
    memo.warm_gate_posted = OrderedDict()


def _posted(memo: kopf.Memo) -> OrderedDict[str, str]:
    return memo.warm_gate_posted


def _remember(memo: kopf.Memo, uid: str, state: str) -> bool:
    """Record ``state`` for the pod; whether it is new (so an Event is due)."""
    posted = _posted(memo)
    if posted.get(uid) == state:
        posted.move_to_end(uid)
        return False
    posted[uid] = state
    posted.move_to_end(uid)
    while len(posted) > POSTED_LIMIT:
        posted.popitem(last=False)
    return True


async def evaluate(view: Mapping[str, Any], memo: kopf.Memo, dataset_index: kopf.Index,
                   node_index: kopf.Index, fresh: Mapping[str, Any] | None = None) -> gate.Decision:
    """Decide for one gated pod and act: remove the gate, or post why it stays."""
    meta = view["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    if _posted(memo).get(uid) == "released":
        return gate.Release("", "released before")
    datasets: dict[str, Any] = {}
    for claim in gate.claims(view):
        if fresh is not None and fresh["metadata"].get("name") == claim and (
                fresh["metadata"].get("namespace") == namespace):
            datasets[claim] = fresh
        else:
            datasets[claim] = _first(dataset_index, (namespace, claim))
    foreign: list[str] = []
    if not any(datasets.values()):
        for claim in datasets:
            pvc = await asyncio.to_thread(memo.kube.read, "PersistentVolumeClaim", claim, namespace)
            if pvc is not None:
                foreign.append(claim)
    decision = gate.decide(view, datasets, _Nodes(node_index), foreign)
    if isinstance(decision, gate.Release):
        if not _remember(memo, uid, "released"):
            return decision
        try:
            done = await asyncio.to_thread(memo.kube.patch_pod, namespace, meta["name"],
                                           gate.ungate_patch(uid))
        except kopf.TemporaryError as exc:
            _posted(memo).pop(uid, None)  # try again on the next event
            log.warning("removing the %s gate of pod %s/%s failed: %s", gate.GATE, namespace,
                        meta["name"], exc)
            return decision
        if done:
            kopf.event(dict(view), type="Normal", reason="WarmGateReleased",
                       message=f"scheduling gate {gate.GATE} removed: {decision.message}")
    elif isinstance(decision, gate.Blocked):
        if _remember(memo, uid, f"blocked:{decision.message}"):
            kopf.warn(dict(view), reason="WarmGateBlocked", message=decision.message)
    elif _remember(memo, uid, "waiting"):
        kopf.event(dict(view), type="Normal", reason="WarmGateWaiting",
                   message=f"scheduling gate {gate.GATE} stays until the data is warm: "
                           f"{decision.message}")
    return decision


@kopf.on.event("v1", "pods", when=_is_gated)
async def gated_pod_changed(body: kopf.Body, memo: kopf.Memo, dataset_index: kopf.Index,
                            node_index: kopf.Index, **_: Any) -> None:
    """A gated pod appeared or changed (including every existing one at operator start)."""
    await evaluate(gate.pod_view(body), memo, dataset_index, node_index)


@kopf.on.event(*RESOURCE)
async def dataset_changed(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                          gated_pods: kopf.Index, dataset_index: kopf.Index,
                          node_index: kopf.Index, **_: Any) -> None:
    """A Dataset's status (or spec) changed: re-decide for the gated pods that mount it."""
    pods = {p["metadata"]["uid"]: p for p in gated_pods.get((namespace, name), ())}
    fresh = _dataset_view(body)
    for view in pods.values():
        await evaluate(view, memo, dataset_index, node_index, fresh=fresh)
        await asyncio.sleep(0)  # let other handlers run between pods
