"""Status aggregation across nodes: every rule on plain data (issue 15, part 3).

The scenarios are the issue's: two workers, then one unreachable, one restarted, all gone; a
Dataset larger than its cache; recent against lifetime hit ratios; warming progress.
"""

from __future__ import annotations

from typing import Any

from datahoard.api import Dataset
from datahoard.operator.conditions import CACHED, STATS_CURRENT, Conditions
from datahoard.operator.reconcile import stats_conditions
from datahoard.operator.status import WorkerPod, format_duration, summarize
from datahoard.stats import RecentStats, WarmingStats, WorkerStats

GiB = 2**30


def ds(**spec: Any) -> Dataset:
    return Dataset.from_body({"metadata": {"namespace": "ml", "name": "d", "generation": 1},
                              "spec": {"source": {"uri": "s3://bucket/x"}, **spec}})


def stats(cached: int, from_cache: int, from_source: int, *, hits: int = 3, misses: int = 1,
          warming: WarmingStats | None = None, recent: tuple[int, int] = (0, 0),
          total: int = 1000, capacity: int = 10**6) -> WorkerStats:
    return WorkerStats(source="s3://bucket/x", mountpoint="/m", ready=True, files=10,
                       total_bytes=total, cached_bytes=cached, capacity_bytes=capacity,
                       served_from_cache_bytes=from_cache, served_from_source_bytes=from_source,
                       fetched_bytes=0, hits=hits, misses=misses, skipped_keys=0, errors=0,
                       warming=warming or WarmingStats(state="done", files_total=10, files_done=10,
                                                       bytes_total=total, bytes_done=total),
                       recent=RecentStats(window_seconds=600, served_from_cache_bytes=recent[0],
                                          served_bytes=recent[1]))


def pod(n: str, ready: bool = True) -> WorkerPod:
    return WorkerPod(name=f"w-{n}", node=n, ip="10.0.0.1", running=True, ready=ready)


def node(out: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in out["nodes"] if n["name"] == name)


BOTH = {"a": stats(900, 300, 100), "b": stats(500, 0, 100)}


def both_seen() -> dict[str, Any]:
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")], BOTH, {}, "T1")
    assert (out["hitRatio"], out["cachedPercentage"], out["readyNodes"]) == ("0.600", "50.0%", "2/2")
    assert not out["stale"] and not node(out, "b")["stale"]
    return out


def test_an_unreachable_worker_keeps_its_contribution_and_is_marked_stale() -> None:
    first = both_seen()
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": BOTH["a"], "b": "TimeoutError from http://10.0.0.2:9470/stats"}, first, "T2")
    # The numbers were 0.750 and 90% with NODES 2/2: they must not move.
    assert (out["hitRatio"], out["cachedPercentage"], out["cachedBytes"]) == ("0.600", "50.0%", 500)
    assert out["readyNodes"] == "1/2"  # NODES counts nodes whose stats are current
    b = node(out, "b")
    assert b["stale"] and b["lastSeen"] == "T1" and b["cachedBytes"] == 500 and b["servedBytes"] == 100
    assert node(out, "a")["lastSeen"] == "T2" and not node(out, "a")["stale"]
    assert out["phase"] == "Degraded" and not out["stale"]

    conds = Conditions([], 1, "T2")
    stats_conditions(ds(), conds, out, {"a": BOTH["a"], "b": "timeout"}, "datahoard-system")
    cond = next(c for c in conds.items if c["type"] == STATS_CURRENT)
    assert (cond["status"], cond["reason"]) == ("False", "StaleStats")
    assert "b since T1" in cond["message"] and "a since" not in cond["message"]

    # Still away at the next pass: lastSeen stays at the last answer, not at the last pass.
    later = summarize(ds(), ["a", "b"], [pod("a"), pod("b", ready=False)],
                      {"a": BOTH["a"]}, out, "T3")
    assert node(later, "b")["lastSeen"] == "T1" and later["hitRatio"] == "0.600"


def test_a_missing_worker_pod_keeps_the_figures_too() -> None:
    first = both_seen()
    out = summarize(ds(), ["a", "b"], [pod("a")], {"a": BOTH["a"]}, first, "T2")
    assert node(out, "b")["stale"] and not node(out, "b")["ready"]
    assert (out["hitRatio"], out["cachedPercentage"], out["readyNodes"]) == ("0.600", "50.0%", "1/2")


def test_every_worker_unreachable_says_stale_instead_of_keeping_silent() -> None:
    first = both_seen()
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")], {"a": "refused", "b": "timeout"}, first, "T2")
    assert out["stale"] is True and out["readyNodes"] == "0/2" and out["phase"] == "Degraded"
    assert out["hitRatio"] == "0.600"  # the last known figures, marked as such
    conds = Conditions([], 1, "T2")
    stats_conditions(ds(), conds, out, {"a": "refused", "b": "timeout"}, "datahoard-system")
    cond = next(c for c in conds.items if c["type"] == STATS_CURRENT)
    assert (cond["status"], cond["reason"]) == ("False", "AllStale")
    assert "as last seen at T1" in cond["message"]


def test_current_stats_make_the_condition_true_again() -> None:
    out = both_seen()
    conds = Conditions([{"type": STATS_CURRENT, "status": "False", "reason": "StaleStats"}], 1, "T")
    stats_conditions(ds(), conds, out, BOTH, "datahoard-system")
    cond = next(c for c in conds.items if c["type"] == STATS_CURRENT)
    assert (cond["status"], cond["message"]) == ("True", "2 cache worker(s) answered the last collection")
    # A worker that never answered has nothing to be stale about; it is not counted as current.
    starting = summarize(ds(), ["a", "b"], [pod("a"), pod("b", ready=False)], {"a": BOTH["a"]}, {}, "T")
    conds = Conditions([], 1, "T")
    stats_conditions(ds(), conds, starting, {"a": BOTH["a"]}, "datahoard-system")
    assert next(c for c in conds.items if c["type"] == STATS_CURRENT)["message"] == (
        "1 cache worker(s) answered the last collection; 1 never answered yet (see WorkersReady)")


def test_a_restarted_worker_that_kept_its_counters_changes_nothing() -> None:
    first = both_seen()
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": stats(900, 300, 100), "b": stats(500, 0, 100)}, first, "T2")
    assert out["hitRatio"] == "0.600" and "counterBase" not in node(out, "a")


def test_a_worker_that_lost_its_counters_does_not_reset_the_lifetime_ratio() -> None:
    first = both_seen()
    # a's cache directory was lost: it counts from zero. 0.600 -> 0.000 was the report.
    reset = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                      {"a": stats(0, 0, 0, hits=0, misses=0), "b": BOTH["b"]}, first, "T2")
    assert reset["hitRatio"] == "0.600"
    a = node(reset, "a")
    assert a["counterBase"] == {"servedBytes": 400, "servedFromCacheBytes": 300, "hits": 3, "misses": 1}
    assert (a["servedBytes"], a["hits"]) == (400, 3)
    # New reads on top of the base; the base is applied once, not again at every pass.
    grown = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                      {"a": stats(100, 100, 0, hits=1, misses=0), "b": BOTH["b"]}, reset, "T3")
    assert node(grown, "a")["servedBytes"] == 500 and node(grown, "a")["servedFromCacheBytes"] == 400
    assert grown["hitRatio"] == "0.667"  # 400 of 600 bytes


def test_recent_and_lifetime_hit_ratios_are_separate() -> None:
    # Lifetime: a cold first epoch dominates. Recent: the last 10 minutes are all hits on a,
    # half on b.
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": stats(900, 300, 700, recent=(300, 300)), "b": stats(900, 100, 900, recent=(100, 200))},
                    {}, "T")
    assert out["hitRatio"] == "0.200" and out["recentHitRatio"] == "0.800"
    idle = summarize(ds(), ["a"], [pod("a")], {"a": stats(900, 300, 700)}, {}, "T")
    assert idle["recentHitRatio"] is None  # nothing read lately: no ratio, not 0.000


def test_warming_progress_rate_and_eta_per_node_and_overall() -> None:
    running = WarmingStats(state="running", files_total=10, files_done=2, bytes_total=1000, bytes_done=250,
                           bytes_per_second=25.0)
    slower = WarmingStats(state="running", files_total=10, files_done=5, bytes_total=1000, bytes_done=500,
                          bytes_per_second=5.0)
    out = summarize(ds(), ["a", "b"], [pod("a"), pod("b")],
                    {"a": stats(250, 0, 0, warming=running), "b": stats(500, 0, 0, warming=slower)}, {}, "T")
    assert node(out, "a")["warming"] == {"state": "running", "bytesDone": 250, "bytesTotal": 1000,
                                         "percentage": "25.0%", "bytesPerSecond": 25, "etaSeconds": 30}
    assert node(out, "b")["warming"]["etaSeconds"] == 100
    assert out["warming"] == {"percentage": "37.5%", "bytesPerSecond": 30, "rate": "30/s",
                              "etaSeconds": 100, "eta": "1m40s"}
    assert out["phase"] == "Warming"
    done = summarize(ds(), ["a"], [pod("a")], {"a": stats(1000, 0, 0)}, {}, "T")
    assert done["warming"]["eta"] == "done" and done["phase"] == "Ready"
    # Status is merge-patched: a finished warming must remove the old ETA, not leave it.
    assert "etaSeconds" in done["warming"] and done["warming"]["etaSeconds"] is None
    assert summarize(ds(warm={"policy": "OnDemand"}), ["a"], [pod("a")],
                     {"a": stats(10, 0, 0)}, {}, "T")["warming"] is None


def test_warming_that_stops_at_capacity_is_not_ready_as_if_complete() -> None:
    total, capacity = 224 * GiB, 200 * GiB
    stopped = WarmingStats(state="done", files_total=1000, files_done=600, bytes_total=total,
                           bytes_done=int(capacity * 0.98), bytes_per_second=10.0,
                           message="stopped at the cache capacity; the rest is fetched on demand")
    spec = ds(cache={"capacity": "200Gi"})
    st = {"a": stats(int(capacity * 0.98), 0, 0, warming=stopped, total=total, capacity=capacity)}
    out = summarize(spec, ["a"], [pod("a")], st, {}, "T")
    assert out["phase"] == "Degraded"
    assert node(out, "a")["warming"]["state"] == "capacity"
    assert out["warming"]["eta"] == "capacity" and out["cachedPercentage"] == "87.5%"
    conds = Conditions([], 1, "T")
    stats_conditions(spec, conds, out, st, "datahoard-system")
    cached = next(c for c in conds.items if c["type"] == CACHED)
    assert (cached["status"], cached["reason"]) == ("False", "CapacityBound")
    assert cached["message"].startswith("capacity 200Gi holds 88% of the dataset (224.0Gi)")
    assert "at least 228.6Gi" in cached["message"]
    # The same cache on demand is fine: OnDemand never promised the whole dataset.
    lazy = ds(cache={"capacity": "200Gi"}, warm={"policy": "OnDemand"})
    assert summarize(lazy, ["a"], [pod("a")], st, {}, "T")["phase"] == "Ready"


def test_durations_fit_a_column() -> None:
    assert [format_duration(s) for s in (5, 100, 7300, 200_000)] == ["5s", "1m40s", "2h1m", "2d7h"]
