"""Which snapshot a Dataset serves, who hands it out and who is restarted onto it, on plain data
(operator/snapshots.py); the same against the real API server is in tests/cluster."""

from __future__ import annotations

from datahoard.operator import snapshots
from datahoard.operator.status import WorkerPod
from datahoard.stats import WarmingStats, WorkerStats

A, B, C = "a" * 64, "b" * 64, "c" * 64
T0 = "2026-12-06T10:00:00Z"


def st(snapshot: str | None) -> WorkerStats:
    return WorkerStats(source="s3://b/x", mountpoint="/m", ready=True, files=1, total_bytes=1, cached_bytes=0,
                       capacity_bytes=10, served_from_cache_bytes=0, served_from_source_bytes=0, fetched_bytes=0,
                       hits=0, misses=0, skipped_keys=0, errors=0, warming=WarmingStats(state="idle"),
                       snapshot=snapshot)


def pod(node: str, ip: str, ready: bool = True) -> WorkerPod:
    return WorkerPod(name=f"w-{node}", node=node, ip=ip, running=True, ready=ready)


def test_the_first_reported_id_is_chosen_and_then_kept():
    assert snapshots.choose(None, {}) is None
    assert snapshots.choose(None, {"n1": "timeout", "n2": st(None)}) is None
    assert snapshots.choose(None, {"n2": st(B), "n1": st(A)}) == A  # same count: first node's
    assert snapshots.choose(None, {"n1": st(A), "n2": st(B), "n3": st(B)}) == B  # most nodes
    assert snapshots.choose(A, {"n1": st(B), "n2": st(B)}) == A  # recorded: kept


def test_peers_are_ready_holders_and_the_others_are_restarted():
    pods = [pod("n1", "10.0.0.1"), pod("n2", "fd00::2"), pod("n3", "10.0.0.3"), pod("n4", "10.0.0.4", ready=False)]
    p = snapshots.plan(A, pods, {"n1": st(A), "n2": st(A), "n3": st(B), "n4": "refused"}, 9100, T0)
    assert p.snapshot == A
    assert p.peers == ["http://10.0.0.1:9100", "http://[fd00::2]:9100"]
    assert p.mismatched == [("n3", B)] and [x.name for x in p.restart] == ["w-n3"]
    ok, reason, message = snapshots.condition(p, [])
    assert (ok, reason) == (False, "SnapshotMismatch") and f"n3 serves {B[:12]}" in message


def test_a_worker_without_snapshots_is_not_restarted():
    p = snapshots.plan(A, [pod("n1", "10.0.0.1"), pod("n2", "10.0.0.2")], {"n1": st(A), "n2": st(None)}, 1, T0)
    assert p.mismatched == [] and p.restart == []
    nodes = [{"name": "n1", "snapshot": A, "stale": False}, {"name": "n2", "stale": False}]
    assert snapshots.condition(p, nodes) == (True, "OneSnapshot",
                                             f"1 node(s) serve snapshot {A[:12]}; peers for nodes that join: 1")


def test_a_snapshot_nobody_can_hand_out_is_forgotten_after_five_minutes():
    down = [pod("n1", "10.0.0.1", ready=False)]
    # A restart (not ready for a moment) only starts the clock; the condition says so.
    p = snapshots.plan(A, down, {}, 1, T0)
    assert (p.snapshot, p.unheld_since) == (A, T0)
    ok, reason, message = snapshots.condition(p, [])
    assert (ok, reason) == (False, "NoHolder") and f"since {T0}" in message
    assert snapshots.plan(A, down, {}, 1, "2026-12-06T10:04:59Z", T0).snapshot == A
    # Five minutes without a ready worker (every cache lost): the next listing becomes it.
    p = snapshots.plan(A, down, {}, 1, "2026-12-06T10:05:00Z", T0)
    assert (p.snapshot, p.peers, p.unheld_since) == (None, [], None)
    assert snapshots.condition(p, []) is None
    # A worker ready again stops the clock.
    p = snapshots.plan(A, [pod("n1", "10.0.0.1")], {"n1": st(A)}, 1, "2026-12-06T10:04:00Z", T0)
    assert (p.snapshot, p.unheld_since, p.peers) == (A, None, ["http://10.0.0.1:1"])
    # A ready worker that serves another one is restarted only once someone holds the chosen
    # one (apply() deletes pods only with peers); the snapshot is not forgotten meanwhile.
    p = snapshots.plan(A, [pod("n1", "10.0.0.1")], {"n1": st(C)}, 1, T0)
    assert p.snapshot == A and p.peers == [] and p.mismatched == [("n1", C)] and p.unheld_since is None


def test_the_config_map_carries_id_and_peers_and_the_worker_reads_it_optionally():
    from datahoard.api import Dataset
    from datahoard.operator.config import OperatorSettings

    ds = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d", "uid": "u1", "generation": 1},
                            "spec": {"source": {"uri": "s3://bucket/x"}}})
    settings = OperatorSettings(namespace="datahoard-system", worker_image="x")
    cm = snapshots.config_map(ds, settings, A, ["http://10.0.0.1:9100", "http://10.0.0.2:9100"])
    assert cm["data"] == {"DATAHOARD_SNAPSHOT_ID": A,
                          "DATAHOARD_SNAPSHOT_FROM": "http://10.0.0.1:9100,http://10.0.0.2:9100"}
    assert cm["metadata"]["annotations"]["datahoard.io/dataset-uid"] == "u1"
    assert snapshots.config_map(ds, settings, None, [])["data"] == {}
    env = snapshots.worker_env(ds)
    assert env[0] == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    assert [(e["name"], e["valueFrom"]["configMapKeyRef"]["optional"]) for e in env[1:]] == [
        ("DATAHOARD_SNAPSHOT_ID", True), ("DATAHOARD_SNAPSHOT_FROM", True), ("DATAHOARD_REFRESH_LISTER", True),
        ("DATAHOARD_REFRESH_TOKEN", True)]
    # A refresh request rides along while a worker lists (operator/refresh.py).
    listing = {"DATAHOARD_REFRESH_LISTER": "n1", "DATAHOARD_REFRESH_TOKEN": "t1"}
    assert snapshots.config_map(ds, settings, A, [], listing)["data"] == {
        "DATAHOARD_SNAPSHOT_ID": A, "DATAHOARD_SNAPSHOT_FROM": "", **listing}


def test_the_peer_policy_admits_only_this_datasets_workers_to_their_stats_port():
    from datahoard.api import Dataset
    from datahoard.operator.config import OperatorSettings

    ds = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d", "uid": "u1", "generation": 1},
                            "spec": {"source": {"uri": "s3://bucket/x"}}})
    settings = OperatorSettings(namespace="datahoard-system", stats_port=9470)
    policy = snapshots.peer_policy(ds, settings)
    workers = {"matchLabels": {"datahoard.io/dataset": snapshots.config_map_name(ds),
                               "app.kubernetes.io/component": "cache-worker"}}
    assert policy["metadata"]["name"] == snapshots.config_map_name(ds) + "-peers"
    assert policy["spec"] == {"podSelector": workers, "policyTypes": ["Ingress"],
                              "ingress": [{"from": [{"podSelector": workers}],
                                           "ports": [{"protocol": "TCP", "port": 9470}]}]}
