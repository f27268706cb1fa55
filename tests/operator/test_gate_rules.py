"""The warm gate's decisions on plain data: pod + Datasets + nodes -> release / wait / blocked."""

from __future__ import annotations

from typing import Any

import pytest

from datahoard import names
from datahoard.operator import gate
from datahoard.operator.gate import Blocked, Release, Wait, decide

GiB = 1024 ** 3
LABEL = names.node_label("ml", "imagenet")
TEXT_LABEL = names.node_label("ml", "text")


def pod(claims=("imagenet",), threshold: str | None = None, **spec: Any) -> dict:
    annotations = {gate.THRESHOLD_ANNOTATION: threshold} if threshold is not None else {}
    return {"metadata": {"name": "trainer", "namespace": "ml", "uid": "u1",
                         "annotations": annotations},
            "spec": {"schedulingGates": [{"name": "other.io/quota"}, {"name": gate.GATE}],
                     "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
                                 for i, c in enumerate(claims)] + [{"name": "shm", "emptyDir": {}}],
                     **spec}}


def node(name: str, labels: dict | None = None, taints=None, unschedulable=False,
         dataset_label: bool = True) -> dict:
    return {"metadata": {"name": name, "labels": {**({LABEL: "true", TEXT_LABEL: "true"} if dataset_label else {}),
                                                   **(labels or {})}},
            "spec": {"taints": taints or [], "unschedulable": unschedulable}}


def dataset(cached: dict[str, int], total: int = 10 * GiB, capacity: str = "100Gi",
            phase: str = "Warming", policy: str = "Eager", name: str = "imagenet",
            ready: bool = True, **status: Any) -> dict:
    return {"metadata": {"name": name, "namespace": "ml"},
            "spec": {"source": {"uri": "s3://bucket/x/"}, "cache": {"capacity": capacity},
                     "warm": {"policy": policy}},
            "status": {"phase": phase, "totalBytes": total,
                       "nodes": [{"name": n, "ready": ready, "cachedBytes": b}
                                 for n, b in cached.items()], **status}}


NODES = {"a": node("a"), "b": node("b")}


def test_released_at_the_threshold_on_the_best_node_and_not_below() -> None:
    ds = dataset({"a": 7 * GiB, "b": 8 * GiB})
    assert decide(pod(threshold="80%"), {"imagenet": ds}, NODES) == Release(
        "b", "imagenet cached to 80% or more on 1 node(s) the pod may land on (e.g. b)")
    waiting = decide(pod(threshold="81%"), {"imagenet": ds}, NODES)
    assert waiting == Wait("Dataset imagenet is 80.0% cached on b (needs 81%)")


def test_default_threshold_is_the_whole_dataset() -> None:
    assert isinstance(decide(pod(), {"imagenet": dataset({"a": 10 * GiB - 1})}, NODES), Wait)
    assert isinstance(decide(pod(), {"imagenet": dataset({"a": 10 * GiB})}, NODES), Release)


@pytest.mark.parametrize("raw,want", [("80%", 80.0), ("80", 80.0), (" 12.5 % ", 12.5), ("0%", 0.0),
                                      ("100%", 100.0)])
def test_threshold_forms(raw: str, want: float) -> None:
    assert gate.threshold(pod(threshold=raw)) == want


@pytest.mark.parametrize("raw", ["eighty", "101%", "-5%", "0.8.1", ""])
def test_a_bad_threshold_is_blocked_with_what_to_write(raw: str) -> None:
    decision = decide(pod(threshold=raw), {"imagenet": dataset({"a": 10 * GiB})}, NODES)
    assert isinstance(decision, Blocked)
    assert gate.THRESHOLD_ANNOTATION in decision.message and '"80%"' in decision.message


def test_a_node_the_pod_may_not_land_on_does_not_count() -> None:
    ds = dataset({"a": 10 * GiB, "b": 1 * GiB})
    nodes = {"a": node("a", labels={"zone": "x"}), "b": node("b", labels={"zone": "y"})}
    assert decide(pod(nodeSelector={"zone": "y"}), {"imagenet": ds}, nodes) == Wait(
        "Dataset imagenet is 10.0% cached on b (needs 100%)")
    assert decide(pod(nodeSelector={"zone": "x"}), {"imagenet": ds}, nodes).node == "a"


def test_required_node_affinity_is_evaluated() -> None:
    ds = dataset({"a": 10 * GiB, "b": 10 * GiB})
    nodes = {"a": node("a", labels={"gpu": "a100", "mem": "80"}),
             "b": node("b", labels={"gpu": "h100", "mem": "96"})}

    def affinity(*terms: dict) -> dict:
        return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": list(terms)}}}

    cases = [
        (affinity({"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}), "b"),
        (affinity({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["a100"]}]}), "b"),
        (affinity({"matchExpressions": [{"key": "mem", "operator": "Gt", "values": ["90"]}]}), "b"),
        (affinity({"matchExpressions": [{"key": "mem", "operator": "Lt", "values": ["90"]}]}), "a"),
        (affinity({"matchExpressions": [{"key": "mem", "operator": "DoesNotExist"}]}), "Blocked"),
        (affinity({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}), "b"),
        # Terms are ORed; the first matches nothing.
        (affinity({"matchExpressions": [{"key": "gpu", "operator": "Exists"},
                                        {"key": "gpu", "operator": "In", "values": ["v100"]}]},
                  {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["a"]}]}), "b"),
    ]
    for aff, want in cases:
        got = decide(pod(affinity=aff), {"imagenet": ds}, nodes)
        assert getattr(got, "node", type(got).__name__) == want, aff
    # Preferred affinity is the scheduler's choice, not a constraint.
    preferred = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "gpu", "operator": "In",
                                                           "values": ["h100"]}]}}]}}
    assert decide(pod(affinity=preferred), {"imagenet": ds}, nodes).node == "a"


def test_taints_need_tolerations_and_cordoned_nodes_do_not_count() -> None:
    ds = dataset({"a": 10 * GiB, "b": 2 * GiB})
    nodes = {"a": node("a", taints=[{"key": "team", "value": "vision", "effect": "NoSchedule"}]),
             "b": node("b")}
    assert isinstance(decide(pod(), {"imagenet": ds}, nodes), Wait)
    tolerated = pod(tolerations=[{"key": "team", "operator": "Equal", "value": "vision",
                                  "effect": "NoSchedule"}])
    assert decide(tolerated, {"imagenet": ds}, nodes).node == "a"
    # PreferNoSchedule does not keep a pod off.
    soft = {"a": node("a", taints=[{"key": "x", "effect": "PreferNoSchedule"}]), "b": node("b")}
    assert decide(pod(), {"imagenet": ds}, soft).node == "a"
    cordoned = {"a": node("a", unschedulable=True), "b": node("b")}
    assert isinstance(decide(pod(), {"imagenet": ds}, cordoned), Wait)


def test_only_ready_labelled_fresh_nodes_count() -> None:
    warm = {"a": 10 * GiB}
    assert isinstance(decide(pod(), {"imagenet": dataset(warm, ready=False)}, NODES), Wait)
    unlabelled = {"a": node("a", dataset_label=False)}
    assert isinstance(decide(pod(), {"imagenet": dataset(warm)}, unlabelled), Wait)
    stale = dataset(warm)
    stale["status"]["nodes"][0]["stale"] = True
    assert isinstance(decide(pod(), {"imagenet": stale}, NODES), Wait)
    # A node that no longer exists is not one to land on.
    assert isinstance(decide(pod(), {"imagenet": dataset({"gone": 10 * GiB, "a": 0})}, NODES), Wait)


def test_every_dataset_must_be_warm_on_one_common_node() -> None:
    one = dataset({"a": 10 * GiB, "b": 0})
    two = dataset({"a": 0, "b": 10 * GiB}, name="text")
    both = pod(claims=("imagenet", "text"))
    decision = decide(both, {"imagenet": one, "text": two}, NODES)
    assert isinstance(decision, Wait) and "no one node has every Dataset warm enough" in decision.message
    two["status"]["nodes"][0]["cachedBytes"] = 10 * GiB
    assert decide(both, {"imagenet": one, "text": two}, NODES).node == "a"


def test_other_pvcs_are_left_to_the_scheduler() -> None:
    mixed = pod(claims=("checkpoints", "imagenet"))
    assert decide(mixed, {"checkpoints": None, "imagenet": dataset({"a": 10 * GiB})}, NODES,
                  foreign_claims={"checkpoints"}).node == "a"


def test_a_pod_without_a_dataset_claim_is_blocked_with_why() -> None:
    nothing = decide(pod(claims=()), {}, NODES)
    assert isinstance(nothing, Blocked) and "mounts no PVC" in nothing.message
    typo = decide(pod(claims=("imagnet", "scratch")), {"imagnet": None, "scratch": None}, NODES,
                  foreign_claims={"scratch"})
    assert typo == Blocked(
        "the datahoard.io/warm scheduling gate waits for a Dataset's PVC and the pod mounts none: "
        "PVC scratch is not a Datahoard volume (no Dataset scratch); there is no PVC or Dataset "
        "imagnet; create the Dataset, fix the claimName, or remove the gate")


def test_a_capacity_smaller_than_the_threshold_is_blocked() -> None:
    small = dataset({"a": 6 * GiB}, total=10 * GiB, capacity="6Gi")
    blocked = decide(pod(), {"imagenet": small}, NODES)
    assert blocked == Blocked(
        "Dataset imagenet: spec.cache.capacity 6Gi holds at most 60.0% of its 10.0Gi, and the pod "
        "asks for 100% (datahoard.io/warm-threshold): raise the capacity or lower the threshold")
    assert decide(pod(threshold="60%"), {"imagenet": small}, NODES).node == "a"


def test_a_failed_dataset_is_blocked_with_its_condition() -> None:
    failed = dataset({}, phase="Failed", conditions=[
        {"type": "SpecValid", "status": "False", "reason": "InvalidSpec",
         "message": "spec.source.uri: hdfs:// sources are not supported"}])
    assert decide(pod(), {"imagenet": failed}, NODES) == Blocked(
        "Dataset imagenet is Failed: spec.source.uri: hdfs:// sources are not supported")


def test_an_invalid_dataset_spec_says_what_is_wrong() -> None:
    bad = dataset({"a": 10 * GiB})
    bad["spec"]["cache"]["capacity"] = "lots"
    decision = decide(pod(), {"imagenet": bad}, NODES)
    assert isinstance(decision, Blocked)
    assert decision.message.startswith("Dataset imagenet has an invalid spec: spec.cache.capacity")


def test_a_dataset_being_deleted_is_blocked() -> None:
    going = dataset({"a": 10 * GiB})
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    decision = decide(pod(), {"imagenet": going}, NODES)
    assert isinstance(decision, Blocked) and "being deleted" in decision.message


def test_a_dataset_whose_pvc_name_is_taken_is_blocked() -> None:
    ds = dataset({"a": 0}, conditions=[{"type": "VolumeReady", "status": "False",
                                         "reason": "NameConflict", "message": "PVC ml/imagenet "
                                         "belongs to someone else"}])
    decision = decide(pod(), {"imagenet": ds}, NODES)
    assert isinstance(decision, Blocked) and "belongs to someone else" in decision.message


def test_on_demand_warming_never_fills_a_cache_nobody_reads() -> None:
    lazy = dataset({"a": 1 * GiB}, policy="OnDemand")
    decision = decide(pod(), {"imagenet": lazy}, NODES)
    assert isinstance(decision, Blocked) and "spec.warm.policy Eager" in decision.message
    # Already warm enough (read by earlier jobs): released all the same.
    assert decide(pod(threshold="10%"), {"imagenet": lazy}, NODES).node == "a"


def test_no_node_the_pod_may_use_among_the_cache_nodes_is_blocked() -> None:
    ds = dataset({"a": 10 * GiB, "b": 10 * GiB})
    decision = decide(pod(nodeSelector={"zone": "mars"}), {"imagenet": ds}, NODES)
    assert decision == Blocked(
        "none of Dataset imagenet's cache nodes (a, b) is one the pod may land on (its "
        "nodeSelector, required node affinity or tolerations rule them out): change the pod's "
        "constraints or the Dataset's spec.placement")


def test_not_listed_or_no_nodes_yet_is_a_wait() -> None:
    unlisted = dataset({})
    del unlisted["status"]["totalBytes"]
    assert decide(pod(), {"imagenet": unlisted}, NODES) == Wait(
        "Dataset imagenet has not listed its source yet")
    assert decide(pod(), {"imagenet": dataset({})}, NODES) == Wait(
        "Dataset imagenet has no cache node yet")


def test_an_empty_dataset_is_warm_everywhere() -> None:
    assert decide(pod(), {"imagenet": dataset({"a": 0}, total=0)}, NODES).node == "a"


def test_the_patch_removes_our_gate_only_and_pins_the_uid() -> None:
    assert gate.ungate_patch("u1") == {"metadata": {"uid": "u1"}, "spec": {
        "schedulingGates": [{"name": "datahoard.io/warm", "$patch": "delete"}]}}
    assert gate.gated(pod())
    assert not gate.gated({"spec": {"schedulingGates": [{"name": "other.io/quota"}]}})


def test_the_indexed_view_decides_like_the_pod() -> None:
    full = pod(threshold="50%", nodeSelector={"zone": "x"},
               tolerations=[{"key": "team", "operator": "Exists"}])
    full["metadata"]["annotations"]["unrelated"] = "x" * 1000
    view = gate.pod_view(full)
    assert "unrelated" not in view["metadata"]["annotations"]
    nodes = {"a": node("a", labels={"zone": "x"}, taints=[{"key": "team", "effect": "NoSchedule"}])}
    ds = dataset({"a": 5 * GiB})
    assert decide(view, {"imagenet": ds}, nodes) == decide(full, {"imagenet": ds}, nodes)
    assert isinstance(decide(view, {"imagenet": ds}, nodes), Release)
