"""Wait for warmth (issue 15, part 4): the operator lifts the ``datahoard.io/warm`` scheduling
gate of a pod once a Dataset it mounts is cached to the pod's threshold on a node it may land on,
and says why when it cannot -- against a real API server, with the operator running for real
under operator/rbac.yaml.

The Dataset's status is driven the way the operator really gets it: workers' ``GET /stats`` over
HTTP. Each fake node's worker pod gets its own loopback address (127.0.0.1, 127.0.0.2) on the
operator's stats port, where a small HTTP server answers with the cached bytes the test sets.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from datahoard import names
from datahoard.stats import WarmingStats, WorkerStats
from tests.support.cluster import Cluster
from tests.support.envtest import REPO
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE
GATE = "datahoard.io/warm"
OTHER_GATE = "example.com/quota"


class StatsServer:
    """A worker's ``/stats`` on ``ip:port``, reporting ``cached`` of ``total`` bytes."""

    def __init__(self, ip: str, port: int, total: int) -> None:
        self.total, self.cached = total, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = json.dumps(server.stats().model_dump()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((ip, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stats(self) -> WorkerStats:
        done = self.cached >= self.total
        return WorkerStats(source="s3://public-data/x/", mountpoint="/m", ready=True, files=10,
                           total_bytes=self.total, cached_bytes=self.cached,
                           capacity_bytes=1 << 40, served_from_cache_bytes=0,
                           served_from_source_bytes=0, fetched_bytes=self.cached, hits=0, misses=0,
                           skipped_keys=0, errors=0,
                           warming=WarmingStats(state="done" if done else "running",
                                                bytes_total=self.total, bytes_done=self.cached))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def workers(operator_env: dict[str, str]) -> Iterator[dict[str, StatsServer]]:
    """Stats for gpu-a (127.0.0.1) and gpu-b (127.0.0.2) of a 1000-byte dataset."""
    port = int(operator_env["DATAHOARD_STATS_PORT"])
    servers = {"gpu-a": StatsServer("127.0.0.1", port, 1000),
               "gpu-b": StatsServer("127.0.0.2", port, 1000)}
    yield servers
    for server in servers.values():
        server.close()


def start_workers(cluster: Cluster, kubelet: Kubelet, namespace: str, dataset: str,
                  node_names: dict[str, str]) -> None:
    """Play the DaemonSet controller and kubelet: both GPU nodes' workers Ready."""
    ds = eventually(lambda: cluster.daemonset(namespace, dataset), what="the worker DaemonSet")
    for key, ip in (("gpu-a", "127.0.0.1"), ("gpu-b", "127.0.0.2")):
        pod = kubelet.start_pod(ds, node_names[key])
        kubelet.set_status(SYSTEM, pod, ready=True, ip=ip)


def node_cached(cluster: Cluster, namespace: str, dataset: str) -> dict[str, int]:
    return {n["name"]: n.get("cachedBytes") for n in
            cluster.status(namespace, dataset).get("nodes") or [] if n.get("ready")}


def gated_pod(cluster: Cluster, namespace: str, name: str, claims: list[str],
              threshold: str | None = None, **spec: Any) -> None:
    annotations = {"datahoard.io/warm-threshold": threshold} if threshold else {}
    cluster.core.create_namespaced_pod(namespace, {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"schedulingGates": [{"name": OTHER_GATE}, {"name": GATE}],
                 "containers": [{"name": "pytorch", "image": "pytorch"}],
                 "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c,
                                                                         "readOnly": True}}
                             for i, c in enumerate(claims)],
                 **spec}})


def example_template() -> dict[str, Any]:
    job = yaml.safe_load((REPO / "examples" / "pytorchjob-warm-gate.yaml").read_text())
    template = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    assert template["metadata"]["annotations"] == {"datahoard.io/warm-threshold": "80%"}
    assert template["spec"]["schedulingGates"] == [{"name": GATE}]
    return template


def gates(cluster: Cluster, namespace: str, pod: str) -> list[str]:
    return [g.name for g in cluster.core.read_namespaced_pod(pod, namespace).spec.scheduling_gates or []]


def event(cluster: Cluster, namespace: str, pod: str, reason: str) -> tuple[str, str] | None:
    """(type, message) of the pod's Event with ``reason``, if there is one."""
    for type_, why, message in cluster.events(namespace, pod):
        if why == reason:
            return type_, message
    return None


def test_gate_lifts_at_the_threshold_on_a_node_the_pod_may_use(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, workers: dict[str, StatsServer]) -> None:
    gpu_a, gpu_b = node_names["gpu-a"], node_names["gpu-b"]
    cluster.apply_dataset(namespace, "imagenet", {"source": {"uri": "s3://public-data/x/"},
                                                  "cache": {"capacity": "1Gi"}})
    workers["gpu-a"].cached, workers["gpu-b"].cached = 500, 700
    start_workers(cluster, kubelet, namespace, "imagenet", node_names)
    eventually(lambda: node_cached(cluster, namespace, "imagenet") == {gpu_a: 500, gpu_b: 700},
               what="status with both nodes' cached bytes")

    # Created once the status says 50% / 70%: their first decision is made on those numbers.
    # The trainer is the Master pod of examples/pytorchjob-warm-gate.yaml as the training
    # operator makes it, with a second gate of another controller (e.g. a queue) added.
    template = example_template()
    template["metadata"]["name"] = "trainer"
    template["spec"]["schedulingGates"].insert(0, {"name": OTHER_GATE})
    cluster.core.create_namespaced_pod(namespace, template)
    gated_pod(cluster, namespace, "pinned", ["imagenet"], threshold="80%",
              nodeSelector={"kubernetes.io/hostname": gpu_a})
    waiting = eventually(lambda: event(cluster, namespace, "trainer", "WarmGateWaiting"),
                         what="the trainer's WarmGateWaiting Event")
    assert waiting == ("Normal", "scheduling gate datahoard.io/warm stays until the data is warm: "
                                 f"Dataset imagenet is 70.0% cached on {gpu_b} (needs 80%)")
    pinned = eventually(lambda: event(cluster, namespace, "pinned", "WarmGateWaiting"),
                        what="the pinned pod's WarmGateWaiting Event")
    assert f"50.0% cached on {gpu_a} (needs 80%)" in pinned[1]
    assert gates(cluster, namespace, "trainer") == [OTHER_GATE, GATE]
    assert gates(cluster, namespace, "pinned") == [OTHER_GATE, GATE]

    # gpu-b reaches 80%: the trainer may land there; the pod pinned to gpu-a may not.
    workers["gpu-b"].cached = 800
    eventually(lambda: gates(cluster, namespace, "trainer") == [OTHER_GATE],
               what="the trainer's warm gate removed, the other controller's gate kept")
    released = eventually(lambda: event(cluster, namespace, "trainer", "WarmGateReleased"),
                          what="the WarmGateReleased Event")
    assert released == ("Normal", "scheduling gate datahoard.io/warm removed: imagenet cached to "
                                  f"80% or more on 1 node(s) the pod may land on (e.g. {gpu_b})")
    eventually(lambda: node_cached(cluster, namespace, "imagenet")[gpu_b] == 800)
    # Status with 800 on gpu-b has been seen (it released the trainer); the pinned pod waits on.
    assert gates(cluster, namespace, "pinned") == [OTHER_GATE, GATE]
    assert event(cluster, namespace, "pinned", "WarmGateReleased") is None

    workers["gpu-a"].cached = 1000
    eventually(lambda: gates(cluster, namespace, "pinned") == [OTHER_GATE],
               what="the pinned pod released once gpu-a is warm")

    # A pod without our gate is never touched, whatever it mounts.
    cluster.core.create_namespaced_pod(namespace, {
        "metadata": {"name": "theirs"},
        "spec": {"schedulingGates": [{"name": OTHER_GATE}],
                 "containers": [{"name": "c", "image": "busybox"}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "imagenet"}}]}})
    gated_pod(cluster, namespace, "late", ["imagenet"])  # 100% on gpu-a now: released at once
    eventually(lambda: gates(cluster, namespace, "late") == [OTHER_GATE], what="late released")
    assert gates(cluster, namespace, "theirs") == [OTHER_GATE]
    assert cluster.events(namespace, "theirs") == []
    assert operator.alive()


@pytest.mark.operator_env(DATAHOARD_SOURCE_SCHEMES='["s3"]')
def test_a_gate_that_can_never_lift_says_why_in_an_event(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, workers: dict[str, StatsServer]) -> None:
    # 1. The cache cannot hold what the pod asks for: 1Mi of a 10Mi dataset.
    for server in workers.values():
        server.total, server.cached = 10 << 20, 1 << 20
    cluster.apply_dataset(namespace, "small", {"source": {"uri": "s3://public-data/x/"},
                                               "cache": {"capacity": "1Mi"}})
    start_workers(cluster, kubelet, namespace, "small", node_names)
    eventually(lambda: cluster.status(namespace, "small").get("totalBytes") == 10 << 20,
               what="the dataset's size in status")
    gated_pod(cluster, namespace, "too-big", ["small"])
    blocked = eventually(lambda: event(cluster, namespace, "too-big", "WarmGateBlocked"),
                         what="WarmGateBlocked for a capacity too small")
    assert blocked == ("Warning", "Dataset small: spec.cache.capacity 1Mi holds at most 10.0% of "
                       "its 10.0Mi, and the pod asks for 100% (datahoard.io/warm-threshold): "
                       "raise the capacity or lower the threshold")
    assert gates(cluster, namespace, "too-big") == [OTHER_GATE, GATE]

    # 2. A Dataset the operator refuses (Failed): its reason reaches the pod.
    cluster.apply_dataset(namespace, "hdfs", {"source": {"uri": "hdfs://namenode:9870/data/"}})
    eventually(lambda: cluster.status(namespace, "hdfs").get("phase") == "Failed")
    gated_pod(cluster, namespace, "on-hdfs", ["hdfs"])
    failed = eventually(lambda: event(cluster, namespace, "on-hdfs", "WarmGateBlocked"),
                        what="WarmGateBlocked for a Failed Dataset")
    assert failed[1].startswith("Dataset hdfs is Failed: spec.source.uri: hdfs:// sources are "
                                "not supported by this installation's cache workers"), failed

    # 3. No Dataset and no PVC of that name (a typo), and a PVC that is not a Datahoard volume.
    cluster.core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "scratch"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    gated_pod(cluster, namespace, "typo", ["smal", "scratch"])
    typo = eventually(lambda: event(cluster, namespace, "typo", "WarmGateBlocked"),
                      what="WarmGateBlocked for a pod without a Dataset PVC")
    assert typo == ("Warning", "the datahoard.io/warm scheduling gate waits for a Dataset's PVC "
                    "and the pod mounts none: PVC scratch is not a Datahoard volume (no Dataset "
                    "scratch); there is no PVC or Dataset smal; create the Dataset, fix the "
                    "claimName, or remove the gate")

    # A blocked reason is posted once, not on every status change, and nothing was released.
    statuses = cluster.status(namespace, "small")["nodes"][0]["lastSeen"]
    eventually(lambda: cluster.status(namespace, "small")["nodes"][0]["lastSeen"] != statuses,
               timeout=30, what="another status pass")
    assert [r for _, r, _ in cluster.events(namespace, "too-big")] == ["WarmGateBlocked"], (
        cluster.events(namespace, "too-big"))
    for pod in ("too-big", "on-hdfs", "typo"):
        assert gates(cluster, namespace, pod) == [OTHER_GATE, GATE], pod

    # 4. Fixing the cause lifts the gate: a bigger cache, warmed in full.
    cluster.apply_dataset(namespace, "small", {"source": {"uri": "s3://public-data/x/"},
                                               "cache": {"capacity": "1Gi"}})
    for server in workers.values():
        server.cached = 10 << 20
    eventually(lambda: gates(cluster, namespace, "too-big") == [OTHER_GATE],
               what="the gate lifted once the capacity suffices and the cache is full")
    assert operator.alive()


def test_the_gate_patch_is_pinned_to_the_pod_it_was_decided_for(cluster: Cluster,
                                                                 namespace: str) -> None:
    """A Job's replacement pod of the same name is another pod: a patch decided for the old one
    (its uid) changes nothing, and says so; for the right uid only our gate goes."""
    from datahoard.operator.gate import ungate_patch
    from datahoard.operator.kube import Kube

    gated_pod(cluster, namespace, "worker-0", ["imagenet"])
    kube = Kube(cluster.api)
    assert kube.patch_pod(namespace, "worker-0", ungate_patch("00000000-old-pod")) is False
    assert gates(cluster, namespace, "worker-0") == [OTHER_GATE, GATE]
    uid = cluster.core.read_namespaced_pod("worker-0", namespace).metadata.uid
    assert kube.patch_pod(namespace, "worker-0", ungate_patch(uid)) is True
    assert gates(cluster, namespace, "worker-0") == [OTHER_GATE]
    assert kube.patch_pod(namespace, "gone", ungate_patch(uid)) is False
