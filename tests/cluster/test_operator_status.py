"""Status that stays true, against the real API server and a real worker (issue 15, part 3):
the printer columns, a stale node's entry and condition, every worker unreachable, a worker
restart that keeps its counts, the Events, and the operator's own /metrics."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from tests.support.cluster import Cluster, worker_stats
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually
from tests.support.ports import free_port

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE
METRICS_PORT = free_port()


def table(cluster: Cluster, namespace: str, *extra: str) -> dict[str, str]:
    """``kubectl get datasets`` as {column: value} for the one Dataset (columns are split on
    runs of two or more spaces, as kubectl pads them)."""
    import re

    lines = cluster.plane.kubectl("get", "datasets", "-n", namespace, *extra).stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", lines[0])]
    cut = lambda line: [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]  # noqa: E731
    return dict(zip(cut(lines[0]), cut(lines[1])))


def node_entry(cluster: Cluster, namespace: str, name: str, node: str) -> dict[str, Any]:
    return next(n for n in cluster.status(namespace, name).get("nodes") or [] if n["name"] == node)


def replace_pod(cluster: Cluster, kubelet: Kubelet, ds: dict[str, Any], node: str, ip: str) -> None:
    """The worker pod on ``node`` replaced by a Ready one at ``ip`` (a pod's IP is immutable)."""
    name = f"{ds['metadata']['name']}-{node}"
    cluster.core.delete_namespaced_pod(name, SYSTEM, grace_period_seconds=0)
    eventually(lambda: name not in [p.metadata.name for p in cluster.core.list_namespaced_pod(SYSTEM).items],
               what=f"pod {name} gone")
    kubelet.start_pod(ds, node)
    kubelet.set_status(SYSTEM, name, ready=True, ip=ip)


def metrics() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in /metrics")


@pytest.mark.integration  # runs a real FUSE worker: skipped without root and /dev/fuse
@pytest.mark.operator_env(DATAHOARD_METRICS_PORT=str(METRICS_PORT))
def test_stale_nodes_restarts_columns_events_and_metrics(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, operator_env: dict[str, str], s3_server: Any, s3: Any, bucket: str) -> None:
    gpu_a, gpu_b = node_names["gpu-a"], node_names["gpu-b"]
    files = {"a.bin": os.urandom(100_000), "b.bin": os.urandom(50_000)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"train/{key}", Body=body)
    cluster.apply_s3_dataset(namespace, "imagenet", f"s3://{bucket}/train/", s3_server.endpoint,
                             cache={"capacity": "1Gi"}, warm={"policy": "Eager", "bandwidthLimit": "100Mi"})

    # The bandwidth cap reaches the worker's command line, in bytes per second.
    ds = eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    cmd = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--bandwidth-limit") + 1] == str(100 * 2**20)

    # Both nodes' pods answer at 127.0.0.1: one real worker plays both nodes' workers.
    port = operator_env["DATAHOARD_STATS_PORT"]
    log = Path(operator_env["DATAHOARD_HOST_ROOT"]).with_name("worker.log")
    pod_a, pod_b = kubelet.start_pod(ds, gpu_a), kubelet.start_pod(ds, gpu_b)
    kubelet.run_container(ds, f"127.0.0.1:{port}", log)
    kubelet.set_status(SYSTEM, pod_a, ready=True)
    kubelet.set_status(SYSTEM, pod_b, ready=True)

    def warm() -> bool:
        status = cluster.status(namespace, "imagenet")
        assert status.get("phase") == "Ready" and status.get("readyNodes") == "2/2", status
        assert status["warming"]["eta"] == "done" and status["warming"]["percentage"] == "100.0%"
        return True

    eventually(warm, what="warming done on both nodes")
    mnt = names.mount_dir(namespace, "imagenet", Path(operator_env["DATAHOARD_HOST_ROOT"]))
    for name in ("a.bin", "a.bin", "b.bin"):
        assert (mnt / name).read_bytes() == files[name]
        # Opens are counted by fanotify once the dataset is cached: reading the stats counts
        # the queued ones, so two opens of a.bin are never merged into one queued event
        # (which fanotify does when the worker is slow to read them, README: kernel opens).
        worker_stats(port)

    def ratios_shown() -> dict[str, Any]:
        real = worker_stats(port)
        status = cluster.status(namespace, "imagenet")
        assert real.served_bytes > 0 and real.recent.served_bytes == real.served_bytes, real
        assert status.get("hitRatio") == f"{real.hit_ratio:.3f}", (status, real)
        assert status.get("recentHitRatio") == f"{real.recent.hit_ratio:.3f}", (status, real)
        return status

    before = eventually(ratios_shown, what="both hit ratios in status")
    row = table(cluster, namespace)
    assert (row["HIT RATIO"], row["NODES"], row["ETA"], row["PHASE"]) == (
        before["recentHitRatio"], "2/2", "done", "Ready")
    assert row["RATE"].endswith("/s")
    wide = table(cluster, namespace, "-o", "wide")
    assert (wide["WARMED"], wide["LIFETIME HIT RATIO"], wide["STALE"]) == (
        "100.0%", before["hitRatio"], "false")
    seen_b = node_entry(cluster, namespace, "imagenet", gpu_b)["lastSeen"]

    # 1. gpu-b's worker stops answering while its pod is Ready (the pod is replaced by one at
    #    an address where nothing listens): its entry is kept, marked stale since its last
    #    answer; the totals do not move.
    replace_pod(cluster, kubelet, ds, gpu_b, ip="127.0.0.2")

    def b_stale() -> dict[str, Any]:
        entry = node_entry(cluster, namespace, "imagenet", gpu_b)
        assert entry.get("stale") is True, entry
        return entry

    entry = eventually(b_stale, what="gpu-b's entry to be stale")
    assert entry["cachedBytes"] == 150_000
    status = cluster.status(namespace, "imagenet")
    assert status["readyNodes"] == "1/2" and status["hitRatio"] == before["hitRatio"]
    assert status["cachedPercentage"] == "100.0%" and status["stale"] is False
    assert node_entry(cluster, namespace, "imagenet", gpu_a)["stale"] is False
    stale = cluster.condition(namespace, "imagenet", "StatsCurrent")
    assert (stale["status"], stale["reason"]) == ("False", "StaleStats")
    assert f"{gpu_b} since {entry['lastSeen']}" in stale["message"] and gpu_a not in stale["message"]
    assert entry["lastSeen"] >= seen_b
    eventually(lambda: any(t == "Warning" and r == "StaleStats" and gpu_b in m
                           for t, r, m in cluster.events(namespace, "imagenet")),
               what="a StaleStats Event")

    # 2. No worker answers at all: status says so instead of keeping silent old numbers.
    kubelet.stop_all()
    eventually(lambda: cluster.status(namespace, "imagenet").get("stale") is True, what="status stale")
    status = cluster.status(namespace, "imagenet")
    assert status["phase"] == "Degraded" and status["readyNodes"] == "0/2"
    assert status["hitRatio"] == before["hitRatio"]
    all_stale = cluster.condition(namespace, "imagenet", "StatsCurrent")
    assert all_stale["reason"] == "AllStale" and "no cache worker answered" in all_stale["message"]
    assert table(cluster, namespace, "-o", "wide")["STALE"] == "true"
    events = cluster.events(namespace, "imagenet")
    assert ("Warning", "Degraded", "Dataset is Degraded (was Ready)") in events
    eventually(lambda: any(r == "AllStale" for _, r, _ in cluster.events(namespace, "imagenet")),
               what="an AllStale Event")

    # The operator's own metrics say the same.
    def scraped() -> bool:
        text = metrics()
        assert sample(text, 'datahoard_operator_datasets{phase="Degraded"}') >= 1
        assert sample(text, "datahoard_operator_stats_failures_total") >= 2
        assert sample(text, "datahoard_operator_stats_collection_seconds_count") >= 1
        return True

    eventually(scraped, what="operator metrics")

    # 3. The worker comes back (same cache directory): it continues its counts, so the lifetime
    #    ratio is the one from before, and the figures are current again.
    kubelet.run_container(ds, f"127.0.0.1:{port}", log)
    replace_pod(cluster, kubelet, ds, gpu_b, ip="127.0.0.1")
    assert worker_stats(port).served_bytes == sum(len(files[n]) for n in ("a.bin", "a.bin", "b.bin"))

    def current_again() -> bool:
        status = cluster.status(namespace, "imagenet")
        assert status.get("stale") is False and status.get("readyNodes") == "2/2", status
        assert status["phase"] == "Ready" and status["hitRatio"] == before["hitRatio"], status
        assert cluster.condition(namespace, "imagenet", "StatsCurrent")["status"] == "True"
        return True

    eventually(current_again, what="current stats after the restart")
    eventually(lambda: ("Normal", "Ready", "Dataset is Ready (was Degraded)")
               in cluster.events(namespace, "imagenet"), what="a Ready Event")
    assert operator.alive()


@pytest.mark.integration
def test_warming_that_stops_at_capacity_says_so(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, operator_env: dict[str, str], s3_server: Any, s3: Any, bucket: str) -> None:
    cpu = node_names["cpu"]
    for i in range(3):  # 1.8 MB of data for a 1Mi cache
        s3.put_object(Bucket=bucket, Key=f"big/{i}.bin", Body=os.urandom(600_000))
    cluster.apply_dataset(namespace, "big", {
        "source": {"uri": f"s3://{bucket}/big/", "endpoint": s3_server.endpoint, "region": "us-east-1",
                   "credentials": "Anonymous"},
        "placement": {"nodeSelector": {"cache": "yes"}},
        "cache": {"capacity": "1Mi"}, "warm": {"policy": "Eager"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "big"), what="the worker DaemonSet")
    port = operator_env["DATAHOARD_STATS_PORT"]
    pod = kubelet.start_pod(ds, cpu)
    kubelet.run_container(ds, f"127.0.0.1:{port}",
                          Path(operator_env["DATAHOARD_HOST_ROOT"]).with_name("worker.log"))
    kubelet.set_status(SYSTEM, pod, ready=True)

    cached = eventually(lambda: cluster.condition(namespace, "big", "Cached").get("reason") == "CapacityBound"
                        and cluster.condition(namespace, "big", "Cached"), what="the Cached condition")
    assert cached["status"] == "False"
    assert cached["message"].startswith("capacity 1Mi holds 57% of the dataset (1.7Mi)"), cached
    assert cpu in cached["message"] and "at least 1.8Mi" in cached["message"]
    status = cluster.status(namespace, "big")
    assert status["phase"] == "Degraded"  # not Ready as if it were all there
    assert status["warming"]["eta"] == "capacity"
    assert status["nodes"][0]["warming"]["state"] == "capacity"
    row = table(cluster, namespace)
    assert (row["PHASE"], row["ETA"]) == ("Degraded", "capacity")
    eventually(lambda: any(t == "Warning" and r == "CapacityBound" and "capacity 1Mi holds" in m
                           for t, r, m in cluster.events(namespace, "big")), what="a CapacityBound Event")
