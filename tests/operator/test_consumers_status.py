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
    assert consumers_status(stats, []) == [
        {"namespace": "team-a", "pod": "trainer-0", "bytes": 500, "hitRatio": "0.600"},
        {"namespace": "team-b", "pod": "eval-0", "bytes": 250, "hitRatio": "1.000"},
        {"namespace": "", "pod": "host", "bytes": 5, "hitRatio": "1.000"},
    ]


def test_top_five_by_bytes():
    stats = {"a": worker(*[("ns", f"p{i}", i * 10, 0) for i in range(1, 9)])}
    got = consumers_status(stats, [])
    assert len(got) == TOP == 5
    assert [c["pod"] for c in got] == ["p8", "p7", "p6", "p5", "p4"]


def test_a_node_that_does_not_answer_keeps_its_last_known_consumers():
    """Aggregates never drop because a node is missing (issue 15): the stale node's own top list,
    kept in its status entry, is added in place of its stats."""
    from datahoard.operator.consumers import node_consumers

    b = worker(("team-a", "trainer-0", 0, 100), ("team-b", "eval-0", 250, 0))
    both = {"a": worker(("team-a", "trainer-0", 300, 100)), "b": b}
    nodes = [{"name": "a", "stale": False}, {"name": "b", "stale": False, "consumers": node_consumers(b)}]
    before = consumers_status(both, nodes)
    nodes[1]["stale"] = True
    assert consumers_status({"a": both["a"], "b": "TimeoutError"}, nodes) == before
    # No worker answered: every node's last list.
    nodes[0].update(stale=True, consumers=node_consumers(both["a"]))
    assert consumers_status({"a": "TimeoutError", "b": "refused"}, nodes) == before
    assert consumers_status({}, []) == []


def test_a_node_keeps_only_its_own_top_five():
    from datahoard.operator.consumers import node_consumers

    kept = node_consumers(worker(*[("ns", f"p{i}", i, 0) for i in range(1, 9)], ("", "other", 10**6, 0)))
    assert [c["pod"] for c in kept] == ["p8", "p7", "p6", "p5", "p4"]
