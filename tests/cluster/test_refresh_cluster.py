"""A growing Dataset refreshed on demand, against the real API server and real workers (issue 15,
part 2): the annotation makes one worker list again, status.snapshot moves to the new listing,
every other worker is restarted onto it and serves the new file through its mount, and an Event
says what changed; a listing the worker refuses (the prefix emptied) ends as Failed with its
message while every node keeps the old files."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from datahoard.stats import WorkerStats
from tests.support.cluster import Cluster
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.integration]  # real FUSE workers
SYSTEM = names.SYSTEM_NAMESPACE


def stats_at(addr: str) -> WorkerStats:
    with urllib.request.urlopen(f"http://{addr}/stats", timeout=5) as resp:
        return WorkerStats.model_validate(json.load(resp))


class Node:
    """One test node: its worker's pod, process, stats address and host directories."""

    def __init__(self, name: str, ip: str, root: Path, ds: dict[str, Any], host_root: str, port: str,
                 kubelet: Kubelet, cluster: Cluster, log: Path) -> None:
        self.name, self.ip, self.root, self.port = name, ip, root, port
        self.addr = f"{ip}:{port}"
        self.kubelet, self.cluster, self.log = kubelet, cluster, log
        # The DaemonSet as it runs on this node: mount and cache under its own root.
        self.ds = copy.deepcopy(ds)
        container = self.ds["spec"]["template"]["spec"]["containers"][0]
        container["command"] = [a.replace(host_root, str(root)) for a in container["command"]]
        self.pod = ""

    def start(self) -> None:
        """What the DaemonSet controller and kubelet do: a pod, its container (env resolved now)."""
        self.pod = self.kubelet.start_pod(self.ds, self.name)
        self.kubelet.run_container(self.ds, self.addr, self.log, node=self.name)
        self.kubelet.set_status(SYSTEM, self.pod, ready=True, ip=self.ip)

    def restart_when_deleted(self) -> None:
        """The operator deleted this worker's pod: end the container and start the new pod."""
        def deleted() -> bool:
            pod = self.cluster.core.read_namespaced_pod(self.pod, SYSTEM)
            assert pod.metadata.deletion_timestamp is not None, f"{self.name}'s worker pod was not deleted"
            return True

        eventually(deleted, timeout=60, what=f"the operator deleting {self.name}'s worker pod")
        self.kubelet.stop_at(self.addr)
        self.cluster.core.delete_namespaced_pod(self.pod, SYSTEM, grace_period_seconds=0)
        eventually(lambda: self.pod not in [p.metadata.name for p in self.cluster.core.list_namespaced_pod(SYSTEM).items],
                   what="the old pod gone")
        self.start()

    def stats(self) -> WorkerStats:
        return stats_at(self.addr)

    def files(self, namespace: str) -> list[str]:
        mount = names.mount_dir(namespace, "imagenet", self.root)
        return sorted(p.name for p in mount.iterdir())


def annotate(cluster: Cluster, namespace: str, value: str) -> None:
    cluster.custom.patch_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, "imagenet",
        {"metadata": {"annotations": {"datahoard.io/refresh": value}}})


def test_a_refresh_on_demand_moves_every_node_to_the_new_listing_and_a_refused_one_fails(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, operator_env: dict[str, str], s3_server: Any, s3: Any, bucket: str,
        tmp_path: Path) -> None:
    for key in ("a.bin", "b.bin"):
        s3.put_object(Bucket=bucket, Key=f"train/{key}", Body=key.encode() * 1000)
    cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
    cluster.apply_dataset(namespace, "imagenet", {
        "source": {"uri": f"s3://{bucket}/train/", "endpoint": s3_server.endpoint, "region": "us-east-1",
                   "secretRef": {"name": "s3-creds"}, "refresh": {}},
        "cache": {"capacity": "1Gi"}, "warm": {"policy": "OnDemand"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    eventually(lambda: cluster.core.read_namespaced_secret(names.worker_name(namespace, "imagenet"), SYSTEM),
               what="the credentials copied for the workers")
    port, host_root = operator_env["DATAHOARD_STATS_PORT"], operator_env["DATAHOARD_HOST_ROOT"]
    log = tmp_path / "workers.log"
    # gpu-a sorts first: it is the lister.
    a, b = (Node(node_names[n], ip, tmp_path / n, ds, host_root, port, kubelet, cluster, log)
            for n, ip in (("gpu-a", "127.0.0.1"), ("gpu-b", "127.0.0.2")))
    a.start()
    first = a.stats().snapshot
    eventually(lambda: cluster.status(namespace, "imagenet").get("snapshot") == first, what="status.snapshot")
    b.start()  # fetches the snapshot from a
    assert b.stats().snapshot == first

    def idle() -> dict[str, Any]:
        r = cluster.status(namespace, "imagenet").get("refresh") or {}
        assert r.get("state") == "Idle", r
        return r

    eventually(idle, what="refresh Idle")

    # 1. A new object in the bucket; the annotation asks for a refresh.
    s3.put_object(Bucket=bucket, Key="train/new.bin", Body=b"landed later" * 100)
    annotate(cluster, namespace, "1")
    a.restart_when_deleted()  # the lister, restarted with the request in its env

    def refreshing() -> bool:
        status = cluster.status(namespace, "imagenet")
        assert (status.get("refresh") or {}).get("state") == "Applying", status.get("refresh")
        cond = cluster.condition(namespace, "imagenet", "SnapshotShared")
        assert cond.get("reason") == "Refreshing" and f"restarting {b.name} onto it" in cond["message"], cond
        return True

    eventually(refreshing, timeout=60, what="the other node being moved (SnapshotShared Refreshing)")
    b.restart_when_deleted()  # then the other node, onto the new snapshot

    def applied() -> dict[str, Any]:
        status = cluster.status(namespace, "imagenet")
        r = status.get("refresh") or {}
        assert r.get("state") == "Idle" and r.get("requested") == "1" and r.get("lastRefreshAt"), r
        assert status["snapshot"] != first
        return status

    status = eventually(applied, timeout=120, what="the refresh applied")
    new = status["snapshot"]
    assert a.stats().snapshot == b.stats().snapshot == new
    assert a.stats().refresh.state == "done" and a.stats().refresh.added_files == 1
    for node in (a, b):
        assert node.files(namespace) == ["a.bin", "b.bin", "new.bin"]
        mount = names.mount_dir(namespace, "imagenet", node.root)
        assert (mount / "new.bin").read_bytes() == b"landed later" * 100
    assert status["refresh"]["addedFiles"] == 1 and status["refresh"].get("token") is None
    cm = cluster.core.read_namespaced_config_map(names.worker_name(namespace, "imagenet"), SYSTEM).data or {}
    # The request is gone; the lister hands the new snapshot out.
    assert cm == {"DATAHOARD_SNAPSHOT_ID": new, "DATAHOARD_SNAPSHOT_FROM": f"http://127.0.0.1:{port}"}, cm

    def event(type_: str, reason: str, text: str) -> str:
        found = [m for t, r, m in cluster.events(namespace, "imagenet") if (t, r) == (type_, reason) and text in m]
        assert found, cluster.events(namespace, "imagenet")
        return found[0]

    message = eventually(lambda: event("Normal", "Refreshed", new[:12]), what="the Refreshed Event")
    assert "1 file(s) added" in message
    assert cluster.condition(namespace, "imagenet", "Refreshed")["status"] == "True"
    assert cluster.condition(namespace, "imagenet", "SnapshotShared")["status"] == "True"
    wide = cluster.plane.kubectl("get", "datasets", "-n", namespace, "-o", "wide").stdout
    assert "REFRESHED" in wide

    # 2. The prefix emptied: the lister refuses the empty listing; Failed, with its reason, and
    #    every node keeps serving the files it had.
    for key in ("a.bin", "b.bin", "new.bin"):
        s3.delete_object(Bucket=bucket, Key=f"train/{key}")
    annotate(cluster, namespace, "2")
    a.restart_when_deleted()

    def failed() -> dict[str, Any]:
        r = cluster.status(namespace, "imagenet").get("refresh") or {}
        assert r.get("state") == "Failed" and r.get("requested") == "2", r
        return r

    r = eventually(failed, timeout=120, what="the refused refresh Failed")
    worker_message = a.stats().refresh.message
    assert a.stats().refresh.state == "failed" and worker_message
    assert r["message"] == f"the listing on {a.name} failed: {worker_message}"
    cond = cluster.condition(namespace, "imagenet", "Refreshed")
    assert (cond["status"], cond["reason"]) == ("False", "RefreshFailed") and worker_message in cond["message"]
    eventually(lambda: event("Warning", "RefreshFailed", worker_message), what="the RefreshFailed Event")
    assert cluster.status(namespace, "imagenet")["snapshot"] == new
    assert a.stats().snapshot == b.stats().snapshot == new
    assert a.files(namespace) == b.files(namespace) == ["a.bin", "b.bin", "new.bin"]
    # b was not touched by the failed refresh.
    assert cluster.core.read_namespaced_pod(b.pod, SYSTEM).metadata.deletion_timestamp is None


def test_the_annotation_on_a_dataset_without_refresh_says_refresh_is_off(
        cluster: Cluster, operator: OperatorProcess, node_names: dict[str, str], namespace: str) -> None:
    cluster.apply_dataset(namespace, "imagenet", {
        "source": {"uri": "s3://bucket/train/", "credentials": "Anonymous"}, "cache": {"capacity": "1Gi"}})
    eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    annotate(cluster, namespace, "now")

    def off() -> bool:
        cond = cluster.condition(namespace, "imagenet", "Refreshed")
        assert (cond.get("status"), cond.get("reason")) == ("False", "RefreshOff"), cond
        assert "set spec.source.refresh" in cond["message"]
        assert any((t, r) == ("Warning", "RefreshOff") for t, r, _ in cluster.events(namespace, "imagenet"))
        return True

    eventually(off, what="the RefreshOff condition and Warning")
    assert not cluster.status(namespace, "imagenet").get("refresh")

