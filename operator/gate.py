"""Wait for warmth: whether a pod gated by ``datahoard.io/warm`` may be scheduled now.

A training pod that starts on a cold cache reads its first epoch from the source; with this
gate it stays unscheduled until the Datasets it mounts are cached to the fraction it asks for
(annotation ``datahoard.io/warm-threshold``, default 100%) on one node it may land on. Pure
decision logic (pod + Datasets + nodes in, :class:`Release` / :class:`Wait` / :class:`Blocked`
out), so every rule is unit-tested with plain data; :mod:`.gate_handlers` does the I/O.

"A node it may land on" is evaluated as far as it is cheap and certain from the Node objects:
the Dataset's node label (the PV's node affinity: a ready worker), the pod's ``nodeSelector``,
its required node affinity (``matchExpressions`` and ``matchFields``) and its tolerations of
NoSchedule/NoExecute taints, and ``unschedulable``. Not evaluated: free resources, pod
(anti-)affinity, topology spread, ports -- the scheduler may still put the pod on another
ready node, which then holds at least the Dataset's ``cachedBytes`` (the least-filled node's).

A blocked pod is not a final verdict: it is re-evaluated like a waiting one, and the handler
posts the reason as a Warning Event so that a person sees why nothing happens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from datahoard import names
from datahoard.api import Dataset, error_summary, format_bytes

from .placement import tolerates

GATE = f"{names.GROUP}/warm"
THRESHOLD_ANNOTATION = f"{names.GROUP}/warm-threshold"
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Release:
    """Remove the gate: ``node`` is one node where every Dataset is warm enough."""

    node: str
    message: str


@dataclass(frozen=True)
class Wait:
    """Not yet; ``message`` says how far warming is (for logs and the first Event)."""

    message: str


@dataclass(frozen=True)
class Blocked:
    """Cannot get there as things stand; ``message`` says what a person must change."""

    message: str


Decision = Release | Wait | Blocked


def gated(pod: Obj) -> bool:
    """Whether the pod still carries our gate (other controllers' gates are theirs)."""
    return any(g.get("name") == GATE for g in (pod.get("spec") or {}).get("schedulingGates") or [])


def claims(pod: Obj) -> list[str]:
    """The PVC names the pod mounts, in volume order, without repeats."""
    out: list[str] = []
    for vol in (pod.get("spec") or {}).get("volumes") or []:
        name = (vol.get("persistentVolumeClaim") or {}).get("claimName")
        if name and name not in out:
            out.append(name)
    return out


def threshold(pod: Obj) -> float:
    """The percentage the pod asks for; ValueError with a message a person can act on."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(THRESHOLD_ANNOTATION)
    if raw is None:
        return 100.0
    match = _PERCENT.match(str(raw))
    if match is None or not 0.0 <= float(match.group(1)) <= 100.0:
        raise ValueError(f"annotation {THRESHOLD_ANNOTATION}: {raw!r} is not a percentage from "
                         "0% to 100% (e.g. \"80%\"); fix it or remove it (default 100%)")
    return float(match.group(1))


def _expression_matches(expr: Obj, value: str | None) -> bool:
    """One NodeSelectorRequirement against a label (or field) value, None when absent."""
    op, values = expr.get("operator"), list(expr.get("values") or [])
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and len(values) == 1:
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _term_matches(term: Obj, node: Obj) -> bool:
    """A NodeSelectorTerm: all its requirements hold; an empty term matches nothing."""
    exprs, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not exprs and not fields:
        return False
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    return (all(_expression_matches(e, labels.get(e.get("key"))) for e in exprs)
            and all(_expression_matches(f, meta.get("name") if f.get("key") == "metadata.name"
                                        else None) for f in fields))


def may_land(pod: Obj, node: Obj) -> bool:
    """Whether the scheduler could put ``pod`` on ``node`` as far as :mod:`this module
    <datahoard.operator.gate>` evaluates (selector, required node affinity, taints)."""
    spec = pod.get("spec") or {}
    nspec = node.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return False
    tolerations = spec.get("tolerations") or []
    if nspec.get("unschedulable") and not tolerates(
            tolerations, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}):
        return False
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None and not any(_term_matches(t, node)
                                        for t in required.get("nodeSelectorTerms") or []):
        return False
    return all(tolerates(tolerations, t) for t in nspec.get("taints") or []
               if t.get("effect") in ("NoSchedule", "NoExecute"))


@dataclass(frozen=True)
class _Verdict:
    """One Dataset's part: blocked (message), or the nodes where it is warm enough."""

    blocked: str | None = None
    warm: frozenset[str] = frozenset()
    progress: str = ""


def _failed_message(status: Obj) -> str:
    bad = [c for c in status.get("conditions") or [] if c.get("status") == "False"]
    return bad[0].get("message", "") if bad else "see `kubectl describe dataset`"


def _dataset_verdict(pod: Obj, body: Obj, percent: float, nodes: Mapping[str, Obj]) -> _Verdict:
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp") or status.get("phase") == "Terminating":
        return _Verdict(blocked=(f"Dataset {name} is being deleted (its deletion waits for the pods "
                                 "that mount it, this one included): delete this pod, or recreate "
                                 "the Dataset once it is gone"))
    if status.get("phase") == "Failed":
        return _Verdict(blocked=f"Dataset {name} is Failed: {_failed_message(status)}")
    try:
        ds = Dataset.from_body(body)
    except pydantic.ValidationError as exc:
        return _Verdict(blocked=f"Dataset {name} has an invalid spec: {error_summary(exc)}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "VolumeReady" and cond.get("reason") == "NameConflict":
            return _Verdict(blocked=f"Dataset {name}'s PVC: {cond.get('message', '')}")
    total = status.get("totalBytes")
    if total is None:
        return _Verdict(progress=f"Dataset {name} has not listed its source yet")
    need = math.ceil(percent / 100.0 * int(total))
    capacity = ds.spec.cache.capacity_bytes
    if capacity < need:
        holds = 100.0 * capacity / int(total)
        return _Verdict(blocked=(
            f"Dataset {name}: spec.cache.capacity {ds.spec.cache.capacity} holds at most "
            f"{holds:.1f}% of its {format_bytes(int(total))}, and the pod asks for {percent:g}% "
            f"({THRESHOLD_ANNOTATION}): raise the capacity or lower the threshold"))
    entries = [e for e in status.get("nodes") or [] if e.get("name")]
    if not entries:
        return _Verdict(progress=f"Dataset {name} has no cache node yet")
    reachable = [e for e in entries if e["name"] in nodes and may_land(pod, nodes[e["name"]])]
    if not reachable:
        shown = ", ".join(sorted(e["name"] for e in entries)[:10])
        return _Verdict(blocked=(
            f"none of Dataset {name}'s cache nodes ({shown}) is one the pod may land on "
            "(its nodeSelector, required node affinity or tolerations rule them out): change "
            "the pod's constraints or the Dataset's spec.placement"))
    label = names.node_label(ds.namespace, ds.name)
    usable = [e for e in reachable if e.get("ready") and not e.get("stale")
              and (nodes[e["name"]].get("metadata") or {}).get("labels", {}).get(label) == "true"]
    warm = frozenset(e["name"] for e in usable if int(e.get("cachedBytes") or 0) >= need)
    if not warm and ds.spec.warm.policy == "OnDemand":
        return _Verdict(blocked=(
            f"Dataset {name} warms on demand (spec.warm.policy OnDemand): nothing fills its "
            "cache before a pod reads it; set spec.warm.policy Eager or remove the "
            f"{GATE} scheduling gate"))
    best = max(usable, key=lambda e: int(e.get("cachedBytes") or 0), default=None)
    if best is None:
        progress = f"Dataset {name} has no ready cache node the pod may land on yet"
    else:
        have = 100.0 * min(int(best.get("cachedBytes") or 0), int(total)) / int(total) if total else 100.0
        progress = (f"Dataset {name} is {have:.1f}% cached on {best['name']} (needs "
                    f"{percent:g}%)")
    return _Verdict(warm=warm, progress=progress)


def decide(pod: Obj, datasets: Mapping[str, Obj | None], nodes: Mapping[str, Obj],
           foreign_claims: Collection[str] = ()) -> Decision:
    """What to do with a gated pod now.

    ``datasets``: for each claim the pod mounts, the Dataset of that name in the pod's
    namespace (metadata, spec, status) or None; ``nodes``: Node objects by name;
    ``foreign_claims``: claims that name an existing PVC which is no Dataset's. Claims of a
    Dataset are the ones waited for; other PVCs (checkpoints, scratch) are left to the
    scheduler, unless the pod mounts no Dataset at all (then the gate would never lift).
    """
    try:
        percent = threshold(pod)
    except ValueError as exc:
        return Blocked(str(exc))
    wanted = claims(pod)
    ours = [c for c in wanted if datasets.get(c) is not None]
    if not ours:
        if not wanted:
            return Blocked(f"the pod mounts no PVC, so the {GATE} scheduling gate has nothing to "
                           "wait for: mount a Dataset's PVC or remove the gate")
        missing = [c for c in wanted if c not in foreign_claims]
        why = "; ".join(
            [f"PVC {c} is not a Datahoard volume (no Dataset {c})" for c in wanted if c in foreign_claims]
            + [f"there is no PVC or Dataset {c}" for c in missing])
        return Blocked(f"the {GATE} scheduling gate waits for a Dataset's PVC and the pod mounts "
                       f"none: {why}; create the Dataset, fix the claimName, or remove the gate")
    verdicts = [_dataset_verdict(pod, datasets[c] or {}, percent, nodes) for c in ours]
    blocked = [v.blocked for v in verdicts if v.blocked]
    if blocked:
        return Blocked("; ".join(blocked))
    common = frozenset.intersection(*(v.warm for v in verdicts))
    progress = "; ".join(v.progress for v in verdicts)
    if common:
        node = sorted(common)[0]
        return Release(node, f"{', '.join(ours)} cached to {percent:g}% or more on "
                             f"{len(common)} node(s) the pod may land on (e.g. {node})")
    if all(v.warm for v in verdicts):
        progress += "; no one node has every Dataset warm enough yet"
    return Wait(progress)


def ungate_patch(uid: str) -> dict[str, Any]:
    """Strategic merge patch that removes our gate and nothing else; ``uid`` pins it to this
    very pod (a Job's replacement pod of the same name gets its own decision)."""
    return {"metadata": {"uid": uid},
            "spec": {"schedulingGates": [{"name": GATE, "$patch": "delete"}]}}


def pod_view(pod: Obj) -> dict[str, Any]:
    """What :func:`decide` and the Event poster need of a pod (kept in the operator's index)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")}
                    | {"annotations": {k: v for k, v in (meta.get("annotations") or {}).items()
                                       if k == THRESHOLD_ANNOTATION}},
        "spec": {"volumes": [{"persistentVolumeClaim": {"claimName": c}} for c in claims(pod)],
                 "nodeSelector": dict(spec.get("nodeSelector") or {}),
                 "affinity": _plain({"nodeAffinity": (spec.get("affinity") or {}).get("nodeAffinity")}),
                 "tolerations": _plain(spec.get("tolerations") or []),
                 "schedulingGates": _plain(spec.get("schedulingGates") or [])},
    }


def _plain(value: Any) -> Any:
    """Plain dicts and lists (kopf hands out read-only views)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value
