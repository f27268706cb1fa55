"""When a growing Dataset lists its source again and how every node moves to the new snapshot
(operator/refresh.py), on plain data; then the wiring (ConfigMap, pod deletions, status) against
the in-memory API (tests/support/fakes/kube.py). The same with real workers is
tests/cluster/test_refresh_cluster.py."""

from __future__ import annotations

import os
from typing import Any

import pytest

from datahoard import names
from datahoard.api import Dataset, Refresh
from datahoard.operator import refresh, snapshots
from datahoard.operator.conditions import Conditions
from datahoard.operator.config import OperatorSettings
from datahoard.operator.reconcile import snapshot_step
from datahoard.operator.status import WorkerPod
from datahoard.stats import RefreshStats, WarmingStats, WorkerStats
from tests.support.fakes.kube import FakeKube

A, B = "a" * 64, "b" * 64
T0 = "2026-12-06T10:00:00Z"
ON = Refresh()
EVERY_30M = Refresh(interval="30m")
SYSTEM = names.SYSTEM_NAMESPACE


def at(minutes: float) -> str:
    s = int(minutes * 60)
    return f"2026-12-06T{10 + s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z"


def st(serving: str | None, **refresh: Any) -> WorkerStats:
    """A worker serving snapshot ``serving``, its last refresh as ``refresh`` (RefreshStats fields)."""
    return WorkerStats(source="s3://b/x", mountpoint="/m", ready=True, files=1, total_bytes=1, cached_bytes=0,
                       capacity_bytes=10, served_from_cache_bytes=0, served_from_source_bytes=0, fetched_bytes=0,
                       hits=0, misses=0, skipped_keys=0, errors=0, warming=WarmingStats(state="idle"),
                       snapshot=serving, refresh=RefreshStats(**refresh))


def pod(node: str, ready: bool = True) -> WorkerPod:
    return WorkerPod(name=f"w-{node}", node=node, ip=f"10.0.0.{node[-1]}", running=True, ready=ready)


PODS = [pod("n2"), pod("n1")]
ON_A = {"n1": st(A), "n2": st(A)}


def idle(**more: Any) -> dict[str, Any]:
    return {"state": "Idle", "since": T0, **more}


# -- when a refresh is due ---------------------------------------------------------------------

def test_off_is_one_snapshot_forever_and_the_annotation_alone_says_refresh_is_off():
    s = refresh.step(None, None, None, A, PODS, ON_A, T0)
    assert (s.status, s.snapshot, s.config, s.restart, s.condition) == (None, A, {}, [], None)
    s = refresh.step(None, "1", idle(), A, PODS, ON_A, T0)
    assert s.status is None and s.restart == [] and s.config == {}
    ok, reason, message = s.condition
    assert (ok, reason) == (False, "RefreshOff") and "set spec.source.refresh" in message


def test_on_records_since_and_a_new_annotation_value_starts_one_refresh_on_the_first_node():
    s = refresh.step(ON, None, None, A, PODS, ON_A, T0)
    assert s.status == idle() and s.restart == [] and s.condition[:2] == (True, "NotYet")
    s = refresh.step(ON, "1", idle(), A, PODS, ON_A, at(1))
    token = refresh.token_for(A, "1", idle())
    assert s.status == {"state": "Listing", "since": T0, "token": token, "lister": "n1", "requestedAt": at(1),
                        "from": A, "requested": "1", "reason": "the datahoard.io/refresh annotation is '1'"}
    assert s.config == {"DATAHOARD_REFRESH_LISTER": "n1", "DATAHOARD_REFRESH_TOKEN": token}
    assert s.restart == [pod("n1")] and s.snapshot == A
    assert s.condition[:2] == (False, "Listing")
    # The same value, once handled, asks for nothing more (on demand: no interval).
    handled = idle(requested="1", lastRefreshAt=at(2))
    assert refresh.step(ON, "1", handled, A, PODS, ON_A, at(600)).status == handled
    assert refresh.step(ON, "2", handled, A, PODS, ON_A, at(3)).status["state"] == "Listing"


def test_each_refresh_gets_its_own_token_and_a_pass_on_an_old_status_the_same_one():
    first = refresh.token_for(A, "1", idle())
    assert len(first) == 16
    # Run again on the status from before the start (kopf's view can lag its own patch): same.
    assert refresh.step(ON, "1", idle(), A, PODS, ON_A, at(2)).status["token"] == first
    # Another annotation value, another snapshot, or a later refresh: another token.
    assert len({first, refresh.token_for(A, "2", idle()), refresh.token_for(B, "1", idle()),
                refresh.token_for(A, "1", idle(lastRefreshAt=at(5)))}) == 4


def test_the_interval_counts_from_the_last_refresh_or_from_since():
    assert refresh.due(EVERY_30M, None, idle(), at(29.9)) is None
    assert refresh.due(EVERY_30M, None, idle(), at(30)) == f"every 30m (last at {T0})"
    done = idle(lastRefreshAt=at(40))
    assert refresh.due(EVERY_30M, None, done, at(69)) is None
    assert refresh.due(EVERY_30M, None, done, at(70))
    s = refresh.step(EVERY_30M, None, done, A, PODS, ON_A, at(70))
    assert s.status["state"] == "Listing" and "requested" not in s.status
    assert refresh.next_due(EVERY_30M, done) == at(70) and refresh.next_due(ON, done) is None
    assert "next by interval at " + at(70) in refresh.condition(EVERY_30M, None, done)[2]


def test_a_failed_refresh_is_tried_again_by_the_next_interval_or_annotation():
    failed = idle(state="Failed", lastRefreshAt=at(10), requested="1", message="x")
    assert refresh.step(EVERY_30M, "1", failed, A, PODS, ON_A, at(39)).status == failed
    assert refresh.step(EVERY_30M, "1", failed, A, PODS, ON_A, at(40)).status["state"] == "Listing"
    assert refresh.step(ON, "2", failed, A, PODS, ON_A, at(11)).status["state"] == "Listing"


def test_no_refresh_without_a_snapshot_or_a_ready_worker_serving_it():
    assert refresh.step(ON, "1", None, None, PODS, {}, T0).status is None
    # n1 is not ready, n2 serves another snapshot, n3 did not answer: nobody can list.
    pods = [pod("n1", ready=False), pod("n2"), pod("n3")]
    s = refresh.step(ON, "1", idle(), A, pods, {"n1": st(A), "n2": st(B), "n3": "timed out"}, T0)
    assert s.status == idle() and s.restart == [] and s.config == {}
    # The first ready holder by node name lists, whatever the pod order.
    s = refresh.step(ON, "1", idle(), A, [pod("n3"), pod("n2"), pod("n1", ready=False)],
                     {"n1": st(A), "n2": st(A), "n3": st(A)}, T0)
    assert s.status["lister"] == "n2" and s.restart == [pod("n2")]


# -- Listing -----------------------------------------------------------------------------------

LISTING = {"state": "Listing", "since": T0, "token": "tok", "lister": "n1", "requestedAt": T0, "from": A,
           "requested": "1", "reason": "r"}


def test_listing_waits_for_its_own_token_keeping_the_request_in_the_config_map():
    for stats in ({"n1": "connection refused"}, {"n1": st(A)}, {"n1": st(A, token="old", state="done", snapshot=B)},
                  {"n1": st(A, token="tok", state="running")}):
        s = refresh.step(ON, "1", LISTING, A, PODS, stats, at(5))
        assert s.status == LISTING and s.snapshot == A and s.restart == []
        assert s.config == {"DATAHOARD_REFRESH_LISTER": "n1", "DATAHOARD_REFRESH_TOKEN": "tok"}
    # An annotation changed meanwhile waits for this refresh to end.
    assert refresh.step(ON, "2", LISTING, A, PODS, {"n1": st(A)}, at(5)).status == LISTING


def test_listing_the_same_snapshot_is_no_change():
    stats = {"n1": st(A, token="tok", state="done", snapshot=A), "n2": st(A)}
    s = refresh.step(ON, "1", LISTING, A, PODS, stats, at(1))
    assert s.status["state"] == "Idle" and s.status["lastRefreshAt"] == at(1) and "token" not in s.status
    assert s.status["message"] == f"no change: the source lists as snapshot {A[:12]} still"
    assert s.snapshot == A and s.config == {} and s.restart == []
    assert s.condition[:2] == (True, "Refreshed")
    assert refresh.events(LISTING, s.status) == [("Normal", "Refreshed", s.status["message"])]


def test_a_new_snapshot_becomes_the_datasets_and_is_applied():
    stats = {"n1": st(B, token="tok", state="done", snapshot=B, added_files=3, changed_files=1, removed_files=2,
                      added_bytes=3 * 1024 * 1024),
             "n2": st(A)}
    s = refresh.step(ON, "1", LISTING, A, PODS, stats, at(1))
    assert s.snapshot == B and s.config == {} and s.restart == []
    assert s.status["state"] == "Applying" and s.status["snapshot"] == B and s.status["from"] == A
    assert (s.status["addedFiles"], s.status["changedFiles"], s.status["removedFiles"]) == (3, 1, 2)
    assert s.status["message"] == f"listed snapshot {B[:12]} on n1: 3 file(s) added (3.0Mi), 1 changed, 2 removed"
    assert s.condition[:2] == (False, "Applying")
    # n2 still serves A (its restart is the snapshot plan's): wait.
    assert refresh.step(ON, "1", s.status, B, PODS, stats, at(2)).status == s.status
    # A worker that does not answer, or is restarting (ready, nothing to say yet), is waited for.
    assert refresh.step(ON, "1", s.status, B, PODS, {"n1": st(B), "n2": "refused"}, at(2)).status == s.status
    # Every ready worker on B (a not-ready one does not hold it up): Idle, with the counts.
    done = refresh.step(ON, "1", s.status, B, PODS + [pod("n3", ready=False)], {"n1": st(B), "n2": st(B)},
                        at(3))
    assert done.status["state"] == "Idle" and done.status["lastRefreshAt"] == at(3)
    assert done.status["message"] == (f"every ready node serves snapshot {B[:12]}: 3 file(s) added (3.0Mi), "
                                      "1 changed, 2 removed")
    assert refresh.events(s.status, done.status) == [("Normal", "Refreshed", done.status["message"])]
    assert refresh.events(done.status, done.status) == []


def test_a_failed_listing_says_why_and_keeps_the_old_snapshot():
    stats = {"n1": st(A, token="tok", state="failed", message="the listing under s3://b/x/ is empty")}
    s = refresh.step(ON, "1", LISTING, A, PODS, stats, at(1))
    assert s.snapshot == A and s.config == {} and s.status["state"] == "Failed"
    assert s.status["message"] == "the listing on n1 failed: the listing under s3://b/x/ is empty"
    assert s.status["lastRefreshAt"] == at(1) and s.status["requested"] == "1"
    ok, reason, message = s.condition
    assert (ok, reason) == (False, "RefreshFailed") and "the previous snapshot is still served" in message
    assert refresh.events(LISTING, s.status) == [("Warning", "RefreshFailed", s.status["message"])]
    assert refresh.events(s.status, s.status) == []


def test_a_lister_that_never_reports_fails_after_the_bound():
    stats = {"n1": st(A)}
    assert refresh.step(ON, "1", LISTING, A, PODS, stats, at(9.9)).status == LISTING
    s = refresh.step(ON, "1", LISTING, A, PODS, stats, at(10))
    assert s.status["state"] == "Failed" and s.config == {}
    assert s.status["message"].startswith("node n1's worker did not report the refresh within 10m0s")
    assert "kubectl logs -n <workers' namespace> w-n1" in s.status["message"]


def test_workers_that_never_move_fail_the_apply_after_the_bound():
    applying = {**LISTING, "state": "Applying", "snapshot": B, "listedAt": T0}
    applying.pop("token")
    stats = {"n1": st(B), "n2": st(A)}
    assert refresh.step(ON, "1", applying, B, PODS, stats, at(29)).status == applying
    s = refresh.step(ON, "1", applying, B, PODS, stats, at(30))
    assert s.status["state"] == "Failed" and f"{B[:12]} was listed but n2 did not move" in s.status["message"]


def test_events_once_per_refresh():
    started = {**LISTING, "reason": "every 30m (last at x)"}
    assert refresh.events(idle(), started) == [
        ("Normal", "Refreshing", "listing the source again on node n1 (every 30m (last at x))")]
    assert refresh.events(started, started) == []
    assert refresh.events({**started, "token": "other"}, started)[0][1] == "Refreshing"
    assert refresh.events(None, None) == []


def test_snapshot_shared_reads_refreshing_while_nodes_move():
    p = snapshots.plan(B, [pod("n1"), pod("n2")], {"n1": st(B), "n2": st(A)}, 9100, T0)
    nodes = [{"name": "n1", "snapshot": B, "stale": False}, {"name": "n2", "snapshot": A, "stale": False}]
    ok, reason, message = snapshots.condition(p, nodes, refreshed_from=A)
    assert (ok, reason) == (False, "Refreshing")
    assert message == (f"moving every node to the refreshed snapshot {B[:12]} (was {A[:12]}): 1 node(s) serve it; "
                       "restarting n2 onto it (readers on it wait for the restart)")
    # A node on some third id is a plain mismatch, refresh or not.
    p = snapshots.plan(B, [pod("n1"), pod("n2")], {"n1": st(B), "n2": st("c" * 64)}, 9100, T0)
    assert snapshots.condition(p, nodes, refreshed_from=A)[1] == "SnapshotMismatch"


# -- wiring: the ConfigMap, the lister's pod, status ---------------------------------------------

@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for var in list(os.environ):
        if var.startswith("DATAHOARD_"):
            monkeypatch.delenv(var)
    return OperatorSettings(stats_port=9100)


def dataset(refresh_spec: dict[str, Any] | None) -> Dataset:
    source: dict[str, Any] = {"uri": "s3://bucket/train"}
    if refresh_spec is not None:
        source["refresh"] = refresh_spec
    return Dataset.from_body({"apiVersion": "datahoard.io/v1alpha1", "kind": "Dataset",
                              "metadata": {"namespace": "ml", "name": "imagenet", "uid": "u1", "generation": 1},
                              "spec": {"source": source}})


def test_a_refresh_writes_the_request_before_restarting_the_lister_and_drops_it_after(settings):
    ds = dataset({})
    kube = FakeKube(namespaces=("ml", SYSTEM))
    for p in PODS:
        kube.add({"kind": "Pod", "metadata": {"name": p.name, "namespace": SYSTEM}, "spec": {"nodeName": p.node}})
    cm = snapshots.config_map_name(ds)
    nodes = [{"name": "n1", "snapshot": A, "stale": False}, {"name": "n2", "snapshot": A, "stale": False}]

    def one_pass(status: dict[str, Any], stats: dict[str, Any], annotation: str | None, now: str) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": nodes}
        conds = Conditions(list(status.get("conditions") or []), 1, now)
        snapshot_step(ds, status, PODS, stats, out, conds, kube, settings, annotation)
        out["conditions"] = conds.items
        return {k: v for k, v in {**status, **out}.items() if k != "nodes"}

    status = one_pass({"snapshot": A}, ON_A, None, T0)
    assert kube.get("ConfigMap", cm, SYSTEM)["data"] == {"DATAHOARD_SNAPSHOT_ID": A, "DATAHOARD_SNAPSHOT_FROM":
                                                          "http://10.0.0.1:9100,http://10.0.0.2:9100"}
    before = status
    status = one_pass(before, ON_A, "1", at(1))
    token = status["refresh"]["token"]
    assert len(token) == 16 and status["refresh"]["lister"] == "n1"
    data = kube.get("ConfigMap", cm, SYSTEM)["data"]
    assert data["DATAHOARD_REFRESH_LISTER"] == "n1" and data["DATAHOARD_REFRESH_TOKEN"] == token
    assert kube.get("Pod", "w-n1", SYSTEM) is None and kube.get("Pod", "w-n2", SYSTEM) is not None
    # The DaemonSet's new pod lists. A pass that still sees the status from before the start
    # asks the same again, and does not restart the lister a second time.
    kube.add({"kind": "Pod", "metadata": {"name": "w-n1", "namespace": SYSTEM}, "spec": {"nodeName": "n1"}})
    assert one_pass(before, ON_A, "1", at(1))["refresh"]["token"] == token
    assert kube.get("Pod", "w-n1", SYSTEM) is not None
    assert kube.get("ConfigMap", cm, SYSTEM)["data"]["DATAHOARD_REFRESH_TOKEN"] == token
    # The lister reports B: the ConfigMap names B with the lister as its only peer, the request
    # is gone, the other worker is restarted onto B, and the token leaves status (merge patch: null).
    listed = {"n1": st(B, token=token, state="done", snapshot=B, added_files=1), "n2": st(A)}
    status = one_pass(status, listed, "1", at(2))
    assert kube.get("ConfigMap", cm, SYSTEM)["data"] == {"DATAHOARD_SNAPSHOT_ID": B,
                                                          "DATAHOARD_SNAPSHOT_FROM": "http://10.0.0.1:9100"}
    assert kube.get("Pod", "w-n2", SYSTEM) is None
    assert status["snapshot"] == B and status["refresh"]["state"] == "Applying" and status["refresh"]["token"] is None
    shared = next(c for c in status["conditions"] if c["type"] == "SnapshotShared")
    assert shared["reason"] == "Refreshing"
    # Refresh turned off: status.refresh and the Refreshed condition go.
    off = dataset(None)
    out: dict[str, Any] = {"nodes": nodes}
    conds = Conditions(list(status["conditions"]), 1, at(3))
    snapshot_step(off, status, PODS, {"n1": st(B), "n2": st(B)}, out, conds, kube, settings, None)
    assert out["refresh"] is None and "Refreshed" not in [c["type"] for c in conds.items]
