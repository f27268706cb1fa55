"""One snapshot per Dataset, for every node, against the real API server and real workers
(issue 15, part 1): the first worker's id becomes status.snapshot; a node that joins after the
bucket changed fetches that snapshot from its peer instead of listing and serves the same file
set; a worker that listed for itself is restarted onto it."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from datahoard import names
from tests.support.cluster import Cluster, worker_stats
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.integration]  # real FUSE workers
SYSTEM = names.SYSTEM_NAMESPACE
SNAPSHOT_ENV = ("DATAHOARD_SNAPSHOT_ID", "DATAHOARD_SNAPSHOT_FROM")


def on_node(ds: dict[str, Any], host_root: str, node_root: Path, snapshot_env: bool = True) -> dict[str, Any]:
    """The DaemonSet as it runs on its own node: its mount and cache under ``node_root`` (all
    test nodes share this machine); ``snapshot_env=False`` plays a worker started before the
    Dataset had a snapshot."""
    ds = copy.deepcopy(ds)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [a.replace(host_root, str(node_root)) for a in container["command"]]
    if not snapshot_env:
        container["env"] = [e for e in container["env"] if e["name"] not in SNAPSHOT_ENV]
    return ds


def files(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def mount_of(node_root: Path, namespace: str) -> Path:
    return names.mount_dir(namespace, "imagenet", node_root)


@pytest.mark.operator_env(DATAHOARD_PEER_NETWORK_POLICY="true")
def test_a_late_node_gets_the_first_snapshot_and_a_stray_one_is_restarted_onto_it(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, operator_env: dict[str, str], s3_server: Any, s3: Any, bucket: str,
        tmp_path: Path) -> None:
    gpu_a, gpu_b = node_names["gpu-a"], node_names["gpu-b"]
    for key in ("a.bin", "b.bin"):
        s3.put_object(Bucket=bucket, Key=f"train/{key}", Body=key.encode() * 1000)
    cluster.apply_dataset(namespace, "imagenet", {
        "source": {"uri": f"s3://{bucket}/train/", "endpoint": s3_server.endpoint, "region": "us-east-1",
                   "credentials": "Anonymous"},
        "cache": {"capacity": "1Gi"}, "warm": {"policy": "OnDemand"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    port = operator_env["DATAHOARD_STATS_PORT"]
    host_root = operator_env["DATAHOARD_HOST_ROOT"]
    log = tmp_path / "workers.log"
    cm_name = names.worker_name(namespace, "imagenet")

    # 1. The first worker lists; its id becomes the Dataset's, and the ConfigMap names it as peer.
    root_a = tmp_path / "node-a"
    pod_a = kubelet.start_pod(ds, gpu_a)
    kubelet.run_container(on_node(ds, host_root, root_a), f"127.0.0.1:{port}", log)
    kubelet.set_status(SYSTEM, pod_a, ready=True, ip="127.0.0.1")
    first = worker_stats(port).snapshot
    assert first and len(first) == 64

    def recorded() -> dict[str, Any]:
        status = cluster.status(namespace, "imagenet")
        assert status.get("snapshot") == first, status
        node = next(n for n in status["nodes"] if n["name"] == gpu_a)
        assert node.get("snapshot") == first
        cm = cluster.core.read_namespaced_config_map(cm_name, SYSTEM).data or {}
        assert cm == {"DATAHOARD_SNAPSHOT_ID": first, "DATAHOARD_SNAPSHOT_FROM": f"http://127.0.0.1:{port}"}, cm
        assert cluster.condition(namespace, "imagenet", "SnapshotShared")["status"] == "True"
        return status

    eventually(recorded, what="status.snapshot and the ConfigMap")
    # Its workers may reach each other's stats port (the chart's policy admits no other worker).
    policy = kubernetes.client.NetworkingV1Api(cluster.api).read_namespaced_network_policy(f"{cm_name}-peers", SYSTEM)
    assert policy.spec.pod_selector.match_labels == policy.spec.ingress[0]._from[0].pod_selector.match_labels == {
        "datahoard.io/dataset": cm_name, "app.kubernetes.io/component": "cache-worker"}
    assert policy.spec.ingress[0].ports[0].port == int(port)
    wide = cluster.plane.kubectl("get", "datasets", "-n", namespace, "-o", "wide").stdout
    assert first in wide

    # 2. The bucket changes; a node joins later: its worker fetches the snapshot, does not list.
    s3.put_object(Bucket=bucket, Key="train/late.bin", Body=b"added after the snapshot")
    root_b = tmp_path / "node-b"
    pod_b = kubelet.start_pod(ds, gpu_b)
    kubelet.run_container(on_node(ds, host_root, root_b), f"127.0.0.2:{port}", log)
    kubelet.set_status(SYSTEM, pod_b, ready=True, ip="127.0.0.2")
    assert worker_stats_at("127.0.0.2", port).snapshot == first
    assert files(mount_of(root_b, namespace)) == files(mount_of(root_a, namespace)) == ["a.bin", "b.bin"]
    assert f"fetching snapshot {first} from http://127.0.0.1:{port}" in log.read_text()

    def both() -> bool:
        cond = cluster.condition(namespace, "imagenet", "SnapshotShared")
        assert cond.get("status") == "True" and cond["message"].startswith("2 node(s) serve"), cond
        return True

    eventually(both, what="both nodes on the snapshot")

    # 3. gpu-b's worker is replaced by one that listed for itself (it started before there was
    #    a snapshot): another id. The condition names it and the operator deletes its pod.
    stop(kubelet, "127.0.0.2", port)
    root_b2 = tmp_path / "node-b2"
    kubelet.run_container(on_node(ds, host_root, root_b2, snapshot_env=False), f"127.0.0.2:{port}", log)
    stray = worker_stats_at("127.0.0.2", port).snapshot
    assert stray != first and "late.bin" in files(mount_of(root_b2, namespace))

    def restarted() -> bool:
        cond = cluster.condition(namespace, "imagenet", "SnapshotShared")
        assert cond.get("reason") == "SnapshotMismatch" and f"{gpu_b} serves {stray[:12]}" in cond["message"], cond
        pod = cluster.core.read_namespaced_pod(pod_b, SYSTEM)
        assert pod.metadata.deletion_timestamp is not None, "gpu-b's worker pod was not deleted"
        return True

    eventually(restarted, what="the stray worker named and its pod deleted")
    assert cluster.status(namespace, "imagenet")["snapshot"] == first  # the chosen one stays

    # 4. The DaemonSet's new pod on gpu-b (same cache directory) starts on the chosen snapshot.
    stop(kubelet, "127.0.0.2", port)
    cluster.core.delete_namespaced_pod(pod_b, SYSTEM, grace_period_seconds=0)
    eventually(lambda: pod_b not in [p.metadata.name for p in cluster.core.list_namespaced_pod(SYSTEM).items],
               what="the old pod gone")
    kubelet.start_pod(ds, gpu_b)
    kubelet.run_container(on_node(ds, host_root, root_b2), f"127.0.0.2:{port}", log)
    kubelet.set_status(SYSTEM, pod_b, ready=True, ip="127.0.0.2")
    assert worker_stats_at("127.0.0.2", port).snapshot == first
    assert files(mount_of(root_b2, namespace)) == ["a.bin", "b.bin"]
    eventually(both, what="the restarted worker on the chosen snapshot")


def worker_stats_at(ip: str, port: str):
    import json
    import urllib.request

    from datahoard.stats import WorkerStats

    with urllib.request.urlopen(f"http://{ip}:{port}/stats", timeout=5) as resp:
        return WorkerStats.model_validate(json.load(resp))


def stop(kubelet: Kubelet, ip: str, port: str) -> None:
    """Stop the worker process serving stats at ``ip`` (no keeper here: it unmounts)."""
    for proc in kubelet.processes:
        if proc.poll() is None and f"{ip}:{port}" in " ".join(proc.args):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            return
    raise AssertionError(f"no worker at {ip}:{port}")
