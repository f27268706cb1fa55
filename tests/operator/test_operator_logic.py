"""Placement and status arithmetic on plain data."""

from __future__ import annotations

from datahoard.api import Dataset
from datahoard.operator import placement
from datahoard.operator.status import WorkerPod, phase, set_condition, summarize
from datahoard.stats import WarmingStats, WorkerStats

GPU = "nvidia.com/gpu"
DEFAULT_TOLERATIONS = [{"key": GPU, "operator": "Exists"}]


def ds(**spec) -> Dataset:
    return Dataset.from_body({"metadata": {"namespace": "ml", "name": "d", "generation": 2},
                              "spec": {"source": {"uri": "s3://bucket/x"}, **spec}})


def node(name: str, gpus: str | None = "8", labels=None, taints=None, unschedulable=False) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"taints": taints or [], "unschedulable": unschedulable},
            "status": {"allocatable": {GPU: gpus} if gpus is not None else {}}}


def test_default_placement_is_gpu_nodes_that_can_run_the_worker() -> None:
    nodes = [node("gpu-a"), node("cpu", gpus=None), node("gpu-zero", gpus="0"),
             node("gpu-tainted", taints=[{"key": GPU, "effect": "NoSchedule"}]),
             node("gpu-other-taint", taints=[{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]),
             node("gpu-prefer", taints=[{"key": "soft", "effect": "PreferNoSchedule"}]),
             node("gpu-cordoned", unschedulable=True)]
    assert placement.pick_nodes(nodes, ds(), GPU, DEFAULT_TOLERATIONS) == [
        "gpu-a", "gpu-prefer", "gpu-tainted"]


def test_node_selector_replaces_the_gpu_default() -> None:
    nodes = [node("a", gpus=None, labels={"cache": "yes"}), node("b", labels={"cache": "no"})]
    assert placement.pick_nodes(nodes, ds(placement={"nodeSelector": {"cache": "yes"}}), GPU,
                                DEFAULT_TOLERATIONS) == ["a"]


def test_max_nodes_keeps_nodes_that_already_cache() -> None:
    nodes = [node(n) for n in ("a", "b", "c", "d")]
    spec = ds(placement={"maxNodes": 2})
    assert placement.pick_nodes(nodes, spec, GPU, DEFAULT_TOLERATIONS) == ["a", "b"]
    assert placement.pick_nodes(nodes, spec, GPU, DEFAULT_TOLERATIONS, current=["d", "b"]) == ["b", "d"]


def test_toleration_rules() -> None:
    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert placement.tolerates([{"operator": "Exists"}], taint)
    assert placement.tolerates([{"key": "k", "operator": "Equal", "value": "v"}], taint)
    assert not placement.tolerates([{"key": "k", "value": "w"}], taint)
    assert not placement.tolerates([{"key": "k", "operator": "Exists", "effect": "NoExecute"}], taint)


def stats(cached: int, from_cache: int, from_source: int, state: str = "done", **kw) -> WorkerStats:
    return WorkerStats(source="s3://bucket/x", mountpoint="/m", ready=True, files=10,
                       total_bytes=1000, cached_bytes=cached, capacity_bytes=10**6,
                       served_from_cache_bytes=from_cache, served_from_source_bytes=from_source,
                       fetched_bytes=0, hits=3, misses=1, skipped_keys=0, errors=0,
                       warming=WarmingStats(state=state), **kw)


def pod(n: str, ready: bool = True, failure: str | None = None) -> WorkerPod:
    return WorkerPod(name=f"w-{n}", node=n, ip="10.0.0.1", running=True, ready=ready, failure=failure)


def test_summary_uses_least_filled_node_and_bytes_weighted_hit_ratio() -> None:
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": stats(900, 300, 100), "b": stats(500, 0, 100)}, {}, "T")
    assert out["cachedBytes"] == 500
    assert out["cachedPercentage"] == "50.0%"
    assert out["hitRatio"] == "0.600"  # 300 of 500 bytes served came from a cache
    assert out["readyNodes"] == "2/2"
    assert out["totalSize"] == "1000"
    assert out["phase"] == "Ready"
    assert [n["name"] for n in out["nodes"]] == ["a", "b"]


def test_each_node_says_whether_it_serves_the_direct_tree() -> None:
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": stats(900, 0, 0, serving="direct"), "b": stats(500, 0, 0)}, {}, "T")
    assert [(n["name"], n["serving"]) for n in out["nodes"]] == [("a", "direct"), ("b", "fuse")]


def test_no_reads_means_no_hit_ratio() -> None:
    out = summarize(ds(), ["a"], [pod("a")], {"a": stats(0, 0, 0)}, {}, "T")
    assert out["hitRatio"] is None


def test_phases() -> None:
    d = ds()
    assert phase(d, ["a"], {}, {}, {}) == "Pending"
    assert phase(d, ["a"], {"a": pod("a", ready=False)}, {}, {}) == "Listing"
    assert phase(d, ["a"], {"a": pod("a")}, {"a": stats(0, 0, 0, state="running")}, {}) == "Warming"
    assert phase(ds(warm={"policy": "OnDemand"}), ["a"], {"a": pod("a")},
                 {"a": stats(0, 0, 0, state="idle")}, {}) == "Ready"
    assert phase(d, ["a"], {"a": pod("a")}, {"a": "timeout"}, {}) == "Degraded"
    assert phase(d, ["a"], {"a": pod("a")}, {"a": stats(1, 0, 0, degraded="disk full")}, {}) == "Degraded"
    # A node that was ready and is not any more degrades the Dataset; one still starting does not.
    both = {"a": pod("a"), "b": pod("b", ready=False)}
    assert phase(d, ["a", "b"], both, {"a": stats(1, 0, 0)}, {}) == "Listing"
    assert phase(d, ["a", "b"], both, {"a": stats(1, 0, 0)}, {"b": {"lastSeen": "T"}}) == "Degraded"
    # ... also when it was the only one, and for as long as it stays away.
    assert phase(d, ["b"], {"b": pod("b", ready=False)}, {}, {"b": {"lastSeen": "T"}}) == "Degraded"


def test_a_dataset_whose_every_worker_fails_is_failed_and_one_failing_worker_degrades_it() -> None:
    d = ds()
    refused = "cannot reach S3 endpoint http://10.0.0.9:9000 for s3://b/p/: connection refused"
    crashing = {"a": pod("a", ready=False, failure=refused), "b": pod("b", ready=False, failure=refused)}
    assert phase(d, ["a", "b"], crashing, {}, {}) == "Failed"
    # One still starting (no failure yet): not every worker fails, but one does.
    assert phase(d, ["a", "b"], {**crashing, "b": pod("b", ready=False)}, {}, {}) == "Degraded"
    # One serving: the Dataset is usable there, and degraded.
    assert phase(d, ["a", "b"], {**crashing, "b": pod("b")}, {"b": stats(1, 0, 0)}, {}) == "Degraded"
    # The worker gets up: the next pass moves on.
    assert phase(d, ["a"], {"a": pod("a")}, {"a": stats(1, 0, 0)}, {}) == "Ready"


def test_condition_transition_time_moves_only_on_status_change() -> None:
    conds = set_condition([], "X", True, "Ok", "fine", 1, "t1")
    conds = set_condition(conds, "X", True, "Ok", "still fine", 2, "t2")
    assert conds == [{"type": "X", "status": "True", "reason": "Ok", "message": "still fine",
                      "lastTransitionTime": "t1", "observedGeneration": 2}]
    conds = set_condition(conds, "X", False, "Bad", "broken", 3, "t3")
    assert conds[0]["lastTransitionTime"] == "t3" and conds[0]["status"] == "False"
