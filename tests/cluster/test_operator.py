"""The operator running for real (`kopf run`) against a real API server, with the test playing
the scheduler, the DaemonSet controller, kubelet and garbage collection."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from tests.support.cluster import Cluster, worker_stats
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE


def pinned_nodes(daemonset: dict[str, Any]) -> list[str]:
    terms = daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return sorted(value for term in terms for value in term["matchFields"][0]["values"])


@pytest.mark.integration  # runs a real FUSE worker: skipped without root and /dev/fuse
def test_workers_volumes_and_real_hit_ratio(cluster: Cluster, operator: OperatorProcess,
                                            kubelet: Kubelet, node_names: dict[str, str],
                                            namespace: str, operator_env: dict[str, str],
                                            s3_server: Any, s3: Any, bucket: str) -> None:
    gpu_a, gpu_b = node_names["gpu-a"], node_names["gpu-b"]
    s3.put_object(Bucket=bucket, Key="train/a.bin", Body=os.urandom(100_000))
    s3.put_object(Bucket=bucket, Key="train/b.bin", Body=os.urandom(50_000))
    cluster.apply_s3_dataset(namespace, "imagenet", f"s3://{bucket}/train/", s3_server.endpoint,
                             cache={"capacity": "1Gi"}, warm={"policy": "OnDemand"})

    # 1. Workers for exactly the GPU nodes, credentials copied; no volume before a worker is ready.
    ds = eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    assert pinned_nodes(ds) == sorted([gpu_a, gpu_b])
    copy = names.worker_name(namespace, "imagenet")
    assert cluster.owned(namespace, "imagenet") == {
        "DaemonSet": [copy], "Secret": [copy], "PersistentVolume": [], "PersistentVolumeClaim": [],
        "Job": []}
    original = cluster.core.read_namespaced_secret("s3-creds", namespace).data
    assert cluster.core.read_namespaced_secret(copy, SYSTEM).data == original
    eventually(lambda: cluster.status(namespace, "imagenet").get("readyNodes") == "0/2")
    assert cluster.status(namespace, "imagenet")["phase"] == "Pending"
    assert cluster.condition(namespace, "imagenet", "VolumeReady")["status"] == "False"

    # 2. Play kubelet: a real worker behind gpu-a's pod; gpu-b's worker never gets ready.
    port = operator_env["DATAHOARD_STATS_PORT"]
    pod_a = kubelet.start_pod(ds, gpu_a)
    pod_b = kubelet.start_pod(ds, gpu_b)
    kubelet.run_container(ds, f"127.0.0.1:{port}", Path(operator_env["DATAHOARD_HOST_ROOT"]).with_name("worker.log"))
    kubelet.set_status(SYSTEM, pod_a, ready=True)
    kubelet.set_status(SYSTEM, pod_b, ready=False)

    # 3. Read through the FUSE view: a.bin twice (miss, then hit), b.bin once (miss).
    mnt = names.mount_dir(namespace, "imagenet", Path(operator_env["DATAHOARD_HOST_ROOT"]))
    for name in ("a.bin", "a.bin", "b.bin"):
        (mnt / name).read_bytes()

    # 4. The ready node is labelled, the volume exists and is pre-bound, status has the numbers.
    label = names.node_label(namespace, "imagenet")
    eventually(lambda: cluster.node_labels(gpu_a).get(label) == "true", what="gpu-a labelled")
    assert label not in cluster.node_labels(gpu_b)
    pv_name = names.pv_name(namespace, "imagenet")
    eventually(lambda: cluster.owned(namespace, "imagenet")["PersistentVolumeClaim"] == ["imagenet"])
    pv = cluster.core.read_persistent_volume(pv_name)
    assert pv.spec.csi.driver == names.CSI_DRIVER_NAME
    assert pv.spec.csi.volume_handle == f"{namespace}/imagenet"
    assert pv.spec.access_modes == ["ReadOnlyMany"]
    assert pv.spec.claim_ref.name == "imagenet" and pv.spec.claim_ref.namespace == namespace
    assert pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0].key == label
    pvc = cluster.core.read_namespaced_persistent_volume_claim("imagenet", namespace)
    assert pvc.spec.volume_name == pv_name

    def status_matches_worker() -> bool:
        real = worker_stats(port)
        status = cluster.status(namespace, "imagenet")
        assert real.served_from_cache_bytes > 0, real
        assert status.get("hitRatio") == f"{real.hit_ratio:.3f}", (status, real)
        assert status["files"] == real.files == 2
        assert status["totalBytes"] == 150_000
        assert status["cachedBytes"] == real.cached_bytes
        assert status["readyNodes"] == "1/2"
        node_a = next(n for n in status["nodes"] if n["name"] == gpu_a)
        assert node_a["ready"] and node_a["hits"] == real.hits and node_a["misses"] == real.misses
        return True

    eventually(status_matches_worker, what="status to show the worker's numbers")
    row = cluster.plane.kubectl("get", "datasets", "-n", namespace).stdout.splitlines()[1]
    assert cluster.status(namespace, "imagenet")["hitRatio"] in row.split()
    assert cluster.condition(namespace, "imagenet", "WorkersReady")["message"] == f"{gpu_b}: worker not ready"

    # 5. A worker that stops being ready (restarting) keeps its node label: the FUSE connection is
    #    held across the restart, so new pods still go where the cache is. A node that was ready
    #    and is not any more makes the Dataset Degraded until it is back.
    kubelet.set_status(SYSTEM, pod_a, ready=False)
    eventually(lambda: cluster.status(namespace, "imagenet").get("phase") == "Degraded")
    assert cluster.node_labels(gpu_a).get(label) == "true", "a restarting worker's node lost its label"
    kubelet.set_status(SYSTEM, pod_a, ready=True)
    eventually(lambda: cluster.status(namespace, "imagenet").get("phase") != "Degraded", what="not Degraded")
    assert cluster.node_labels(gpu_a).get(label) == "true"

    # 6. Delete: volume, labels and workers go; once their pods are gone, caches are cleaned.
    cluster.plane.kubectl("delete", "dataset", "imagenet", "-n", namespace, "--wait=false")
    eventually(lambda: cluster.daemonset(namespace, "imagenet") is None, what="workers removed")
    assert cluster.owned(namespace, "imagenet")["PersistentVolume"] == []
    assert cluster.owned(namespace, "imagenet")["PersistentVolumeClaim"] == []
    assert label not in cluster.node_labels(gpu_a)
    assert cluster.dataset(namespace, "imagenet") is not None  # still waiting for worker pods
    kubelet.stop_all()
    for pod in (pod_a, pod_b):  # garbage collection's part
        cluster.core.delete_namespaced_pod(pod, SYSTEM, grace_period_seconds=0)
    eventually(lambda: cluster.dataset(namespace, "imagenet") is None, what="the Dataset to go")
    assert cluster.owned(namespace, "imagenet") == {
        "DaemonSet": [], "Secret": [], "PersistentVolume": [], "PersistentVolumeClaim": [],
        "Job": sorted([gpu_a, gpu_b])}


def test_deletion_waits_for_pods_using_the_volume_and_survives_restart(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
        node_names: dict[str, str], namespace: str) -> None:
    gpu_a = node_names["gpu-a"]
    cluster.apply_dataset(namespace, "web", {"source": {"uri": "s3://public-data/web/"},
                                             "warm": {"policy": "OnDemand"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "web"), what="the worker DaemonSet")
    # Anonymous source: no Secret copy, and no credentials in the worker's env.
    assert cluster.owned(namespace, "web")["Secret"] == []
    env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if "secretKeyRef" in e.get("valueFrom", {})] == []
    worker = kubelet.start_pod(ds, gpu_a)
    kubelet.set_status(SYSTEM, worker, ready=True)
    eventually(lambda: cluster.owned(namespace, "web")["PersistentVolumeClaim"] == ["web"])
    # Nothing answers on the stats port: that is a Degraded Dataset with the reason, not a crash.
    eventually(lambda: cluster.status(namespace, "web").get("phase") == "Degraded")
    assert "stats unavailable" in cluster.condition(namespace, "web", "WorkersReady")["message"]

    cluster.core.create_namespaced_pod(namespace, {
        "metadata": {"name": "trainer"},
        "spec": {"nodeName": gpu_a, "containers": [{"name": "pytorch", "image": "pytorch"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "web",
                                                                         "readOnly": True}}]}})

    # Deleted while the operator is down: the finalizer holds the Dataset until it is back.
    operator.stop()
    cluster.plane.kubectl("delete", "dataset", "web", "-n", namespace, "--wait=false")
    dataset = cluster.dataset(namespace, "web")
    assert dataset is not None and dataset["metadata"].get("deletionTimestamp")
    assert f"{names.GROUP}/cleanup" in dataset["metadata"]["finalizers"]
    # Created while the operator is down: picked up when it comes back.
    cluster.apply_dataset(namespace, "late", {"source": {"uri": "s3://public-data/late/"}})
    operator.start()
    eventually(lambda: cluster.daemonset(namespace, "late"), what="the late Dataset's workers")

    blocked = eventually(lambda: cluster.condition(namespace, "web", "DeletionBlocked"),
                         what="the DeletionBlocked condition")
    assert blocked["status"] == "True" and "trainer" in blocked["message"]
    assert cluster.status(namespace, "web")["phase"] == "Terminating"
    assert cluster.owned(namespace, "web")["PersistentVolumeClaim"] == ["web"]
    assert cluster.daemonset(namespace, "web") is not None

    # kubelet's part: the pod is gone only once its containers stopped (grace period 0 here).
    cluster.core.delete_namespaced_pod("trainer", namespace, grace_period_seconds=0)
    eventually(lambda: cluster.daemonset(namespace, "web") is None, what="workers removed")
    cluster.core.delete_namespaced_pod(worker, SYSTEM, grace_period_seconds=0)
    eventually(lambda: cluster.dataset(namespace, "web") is None, what="the Dataset to go")
    assert cluster.owned(namespace, "web") == {
        "DaemonSet": [], "Secret": [], "PersistentVolume": [], "PersistentVolumeClaim": [],
        "Job": sorted([gpu_a, node_names["gpu-b"]])}
    cluster.plane.kubectl("delete", "dataset", "late", "-n", namespace, "--timeout=60s")
    assert operator.alive()


# An installation whose worker image reads only S3: hdfs:// passes the API but not the operator.
@pytest.mark.operator_env(DATAHOARD_SOURCE_SCHEMES='["s3"]')
def test_problems_become_conditions_and_spec_changes_apply(
        cluster: Cluster, operator: OperatorProcess, node_names: dict[str, str],
        namespace: str) -> None:
    # A source the API accepts but this installation's workers cannot read: Failed, and why.
    cluster.apply_dataset(namespace, "hadoop", {"source": {"uri": "hdfs://namenode:9870/data"}})
    # Credentials that do not exist yet, and a selector that matches nothing.
    cluster.apply_dataset(namespace, "private", {"source": {"uri": "s3://private/x",
                                                            "secretRef": {"name": "creds"}}})
    cluster.apply_dataset(namespace, "picky", {"source": {"uri": "s3://bucket/x"},
                                               "placement": {"nodeSelector": {"cache": "maybe"}}})

    eventually(lambda: cluster.status(namespace, "hadoop").get("phase") == "Failed")
    spec_valid = cluster.condition(namespace, "hadoop", "SpecValid")
    assert spec_valid["status"] == "False" and spec_valid["reason"] == "InvalidSpec"
    assert "hdfs:// sources are not supported" in spec_valid["message"]
    assert spec_valid["observedGeneration"] == 1
    eventually(lambda: any(t == "Warning" and r == "InvalidSpec" and "hdfs://" in m
                           for t, r, m in cluster.events(namespace, "hadoop")),
               what="an InvalidSpec Event")
    assert cluster.daemonset(namespace, "hadoop") is None

    missing = eventually(lambda: cluster.condition(namespace, "private", "CredentialsReady"))
    assert missing["reason"] == "SecretNotFound" and f"{namespace}/creds" in missing["message"]
    assert cluster.daemonset(namespace, "private") is None
    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"},
                                                      "stringData": {"AWS_ACCESS_KEY_ID": "id"}})
    eventually(lambda: cluster.condition(namespace, "private", "CredentialsReady").get("reason")
               == "SecretKeyMissing")
    assert "AWS_SECRET_ACCESS_KEY" in cluster.condition(namespace, "private", "CredentialsReady")["message"]
    cluster.core.patch_namespaced_secret("creds", namespace, {"data": {
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"secret").decode()}})
    eventually(lambda: cluster.daemonset(namespace, "private"), what="workers once creds exist")
    eventually(lambda: cluster.condition(namespace, "private", "CredentialsReady")["status"] == "True")
    assert cluster.condition(namespace, "private", "Reconciled")["status"] == "True"

    nodes = eventually(lambda: cluster.condition(namespace, "picky", "NodesSelected"))
    assert nodes["status"] == "False" and "cache=maybe" in nodes["message"]
    assert cluster.status(namespace, "picky")["phase"] == "Pending"
    assert cluster.daemonset(namespace, "picky") is None

    # Spec changes: a selector that matches the CPU node, and a bigger cache.
    cluster.apply_dataset(namespace, "picky", {"source": {"uri": "s3://bucket/x"},
                                               "placement": {"nodeSelector": {"cache": "yes"}},
                                               "cache": {"capacity": "20Gi"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "picky"), what="workers after the fix")
    assert pinned_nodes(ds) == [node_names["cpu"]]
    cmd = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--capacity") + 1] == "20Gi"
    eventually(lambda: cluster.condition(namespace, "picky", "NodesSelected").get("status") == "True")
    assert cluster.condition(namespace, "picky", "NodesSelected")["observedGeneration"] == 2
    cluster.apply_dataset(namespace, "picky", {"source": {"uri": "s3://bucket/x"},
                                               "cache": {"capacity": "30Gi"}})

    def moved_to_gpus() -> bool:
        ds = cluster.daemonset(namespace, "picky")
        cmd = ds["spec"]["template"]["spec"]["containers"][0]["command"]
        return (pinned_nodes(ds) == sorted([node_names["gpu-a"], node_names["gpu-b"]])
                and cmd[cmd.index("--capacity") + 1] == "30Gi")

    eventually(moved_to_gpus, what="the DaemonSet to follow the spec")
    for name in ("hadoop", "private", "picky"):
        cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--timeout=60s")
    assert operator.alive()


def test_operator_rides_out_an_api_server_outage(cluster: Cluster, operator: OperatorProcess,
                                                 node_names: dict[str, str], namespace: str) -> None:
    cluster.apply_dataset(namespace, "before", {"source": {"uri": "s3://bucket/before"}})
    eventually(lambda: cluster.daemonset(namespace, "before"), what="workers before the outage")
    cluster.plane.stop_apiserver(crash=True)
    # Long enough for watches, timers and the stats loop to hit the dead server several times.
    time.sleep(float(os.environ.get("DATAHOARD_TEST_OUTAGE", "8")))
    assert operator.alive()
    cluster.plane.start_apiserver()
    cluster.apply_dataset(namespace, "after", {"source": {"uri": "s3://bucket/after"}})
    eventually(lambda: cluster.daemonset(namespace, "after"), timeout=120,
               what="the operator to resume after the outage")
    assert operator.alive()
    for name in ("before", "after"):
        cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--timeout=60s")


def test_hdfs_sources_take_their_own_credentials(cluster: Cluster, operator: OperatorProcess,
                                                 node_names: dict[str, str], namespace: str) -> None:
    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "hdfs"},
                                                      "stringData": {"AWS_ACCESS_KEY_ID": "x"}})
    cluster.apply_dataset(namespace, "logs", {"source": {"uri": "hdfs://namenode:9870/logs",
                                                         "secretRef": {"name": "hdfs"}}})
    missing = eventually(lambda: cluster.condition(namespace, "logs", "CredentialsReady"))
    assert missing["reason"] == "SecretKeyMissing"
    assert "DATAHOARD_HDFS_USER or DATAHOARD_HDFS_DELEGATION_TOKEN" in missing["message"]
    cluster.core.patch_namespaced_secret("hdfs", namespace, {"stringData": {"DATAHOARD_HDFS_USER": "train"}})
    ds = eventually(lambda: cluster.daemonset(namespace, "logs"), what="hdfs workers")
    env = {e["name"] for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
           if "secretKeyRef" in e.get("valueFrom", {})}
    assert env == {"DATAHOARD_HDFS_USER", "DATAHOARD_HDFS_DELEGATION_TOKEN", "DATAHOARD_HDFS_NAMENODES"}
    # Only the keys the worker reads are copied next to it.
    copy = cluster.core.read_namespaced_secret(names.worker_name(namespace, "logs"), SYSTEM)
    assert set(copy.data) == {"DATAHOARD_HDFS_USER"}
    cluster.plane.kubectl("delete", "dataset", "logs", "-n", namespace, "--timeout=60s")
