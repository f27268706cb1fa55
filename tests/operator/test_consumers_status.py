"""status.consumers: per-pod bytes from every answering worker, added up by pod, top 5, on
plain data (the worker's side is tests/cache_worker/test_consumers*.py)."""

from __future__ import annotations

from datahoard.operator.consumers import TOP, consumers_status
from datahoard.stats import ConsumerStats, WarmingStats, WorkerStats


def worker(*consumers: tuple[str, str, int, int]) -> WorkerStats:
    return WorkerStats(source="s3://b/x", mountpoint="/m", ready=True, files=1, total_bytes=1, cached_bytes=1,
                       capacity_bytes=1, served_from_cache_bytes=0, served_from_source_bytes=0, fetched_bytes=0,
                       hits=0, misses=0, skipped_keys=0, errors=0, warming=WarmingStats(state="done"),
                       consumers=[ConsumerStats(namespace=ns, pod=pod, served_from_cache_bytes=c,
                                                served_from_source_bytes=s) for ns, pod, c, s in consumers])


def test_a_pod_on_two_nodes_is_one_consumer_and_other_is_left_out():
    stats = {
        "a": worker(("team-a", "trainer-0", 300, 100), ("", "host", 5, 0), ("", "other", 10_000, 0)),
        "b": worker(("team-a", "trainer-0", 0, 100), ("team-b", "eval-0", 250, 0)),
    }
    assert consumers_status(stats, {}) == [
        {"namespace": "team-a", "pod": "trainer-0", "bytes": 500, "hitRatio": "0.600"},
        {"namespace": "team-b", "pod": "eval-0", "bytes": 250, "hitRatio": "1.000"},
        {"namespace": "", "pod": "host", "bytes": 5, "hitRatio": "1.000"},
    ]


def test_top_five_by_bytes():
    stats = {"a": worker(*[("ns", f"p{i}", i * 10, 0) for i in range(1, 9)])}
    got = consumers_status(stats, {})
    assert len(got) == TOP == 5
    assert [c["pod"] for c in got] == ["p8", "p7", "p6", "p5", "p4"]


def test_no_worker_answered_keeps_the_last_list():
    old = {"consumers": [{"namespace": "ns", "pod": "p", "bytes": 7, "hitRatio": "1.000"}]}
    assert consumers_status({"a": "TimeoutError", "b": "refused"}, old) == old["consumers"]
    assert consumers_status({}, {}) == []
