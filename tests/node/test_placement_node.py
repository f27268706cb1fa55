"""The pod lands only where the cache is, in space (issue 14, item 5): a second node on this machine
(tests/node/second-node.sh: its own containerd, kubelet, cgroup root and mount namespace), both
with (fake) GPUs, a Dataset pinned to the second node by ``spec.placement.nodeSelector``: its
worker runs there and only there, the operator labels that node only, reader pods of its PVC land
there (and read every byte through the second node's CSI plugin and worker), and a reader held to
the first node stays Pending because the PV's node affinity rules that node out.

Runs before test_user_path.py (file order): that module's last test uninstalls the chart. The
second node is up only for this module, so the other modules see one node.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml

from datahoard import names
from tests.support.nodekube import IMAGE, NODE_DIR, REPO, SYSTEM_NS, TOOLS_DIR, VERIFY, Kube, eventually, pod_events

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

NS = "placement"
SECOND_NODE_SH = REPO / "tests" / "node" / "second-node.sh"
#: The scheduler's words for a node the PV's node affinity excludes (v1.34; before, "conflict").
AFFINITY_REASONS = ("didn't match PersistentVolume's node affinity", "volume node affinity conflict")
FILES = 60   # conftest.dataset_bucket


def second_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SECOND_NODE_SH), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOOLS_DIR": str(TOOLS_DIR)})


def reader(name: str, node_selector: dict[str, str] | None = None) -> str:
    spec = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "reader", "image": IMAGE, "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": True}}]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="module")
def two_nodes(gpu_node: Kube, bridge_s3, dataset_bucket) -> Iterator[tuple[Kube, str]]:
    """The second node up and Ready with fake GPUs and the chart's CSI plugin registered on it;
    torn down after the module (the Dataset first, so its cleanup runs on that node)."""
    kube = gpu_node
    started = time.monotonic()
    up = second_node("up")
    if up.returncode != 0:
        second_node("down")
        pytest.fail(f"second-node.sh up failed:\n{up.stderr[-4000:]}")
    print(up.stderr)
    node2 = f"{kube.node}-2"
    try:
        kube("patch", "node", node2, "--subresource=status", "--type=json", "-p",
             '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]')
        eventually(lambda: "csi.datahoard.io" in kube("get", "csinode", node2, "-o",
                                                      "jsonpath={.spec.drivers[*].name}", check=False),
                   240, f"the CSI plugin registered with {node2}'s kubelet")
        print(f"second node up and its CSI plugin registered in {time.monotonic() - started:.0f} s")
        yield kube, node2
    finally:
        started = time.monotonic()
        # The readers' `sleep` (pid 1) ignores SIGTERM: without this, 30 s of grace period each.
        kube("delete", "pods", "--all", "-n", NS, "--grace-period=1", "--wait=true", check=False, timeout=120)
        kube("delete", "namespace", NS, "--wait=true", check=False, timeout=300)
        down = second_node("down")
        # Pods of the deleted Node (the chart's DaemonSet's) go at once, not at the pod GC's pace.
        kube("delete", "pods", "-A", "--field-selector", f"spec.nodeName={node2}", "--force",
             "--grace-period=0", check=False, timeout=60)
        print(f"namespace deleted and second node down in {time.monotonic() - started:.0f} s")
        assert down.returncode == 0, f"second-node.sh down left things behind:\n{down.stderr[-3000:]}"


def test_a_pinned_dataset_is_cached_and_read_only_on_its_node(two_nodes: tuple[Kube, str], bridge_s3) -> None:
    kube, node2 = two_nodes
    node1 = kube.node
    kube("create", "namespace", NS)
    kube("apply", "-n", NS, "-f", str(REPO / "examples" / "s3-secret.yaml"))
    body = yaml.safe_load((REPO / "examples" / "dataset.yaml").read_text()
                          .replace("http://minio.minio:9000", bridge_s3.endpoint))
    body["spec"]["placement"]["nodeSelector"] = {"kubernetes.io/hostname": node2}
    kube.apply(yaml.safe_dump(body), namespace=NS)
    eventually(lambda: kube("get", "-n", NS, "dataset", "imagenet", "-o", "jsonpath={.status.phase}") == "Ready",
               300, "Dataset imagenet Ready")

    workers = kube.json("pods", "-n", SYSTEM_NS, "-l", f"datahoard.io/dataset={names.worker_name(NS, 'imagenet')}")
    assert [w["spec"]["nodeName"] for w in workers["items"]] == [node2], workers["items"]
    label = names.node_label(NS, "imagenet")
    assert kube.json("node", node2)["metadata"]["labels"].get(label) == "true"
    assert label not in kube.json("node", node1)["metadata"]["labels"]
    # The cache is on the second node's disk (its host root, bound in its mount namespace).
    assert os.path.isdir(f"{NODE_DIR}/node2/datahoard/cache/{NS}/imagenet")
    assert not os.path.exists(f"{NODE_DIR}/var/datahoard/cache/{NS}/imagenet")

    # Free to go anywhere but for the PVC: both land on the second node, and read every byte.
    for pod in ("reader-0", "reader-1"):
        kube.apply(reader(pod), namespace=NS)
    for pod in ("reader-0", "reader-1"):
        kube("wait", "-n", NS, "--for=condition=Ready", f"pod/{pod}", "--timeout=180s", timeout=200)
        assert kube("get", "pod", "-n", NS, pod, "-o", "jsonpath={.spec.nodeName}") == node2
        out = kube("exec", "-n", NS, pod, "--", "python3", "-c", VERIFY, timeout=120).strip()
        assert out == f"verified {FILES} files", (pod, out)

    # Held to the first node, a reader cannot have the volume: Pending, and the scheduler says why.
    kube.apply(reader("held-to-node1", {"kubernetes.io/hostname": node1}), namespace=NS)
    events = eventually(lambda: [m for _, r, m in pod_events(kube, NS, "held-to-node1")
                                 if r == "FailedScheduling" and any(w in m for w in AFFINITY_REASONS)],
                        120, "FailedScheduling because of the PV's node affinity")
    print("scheduler:", events[0])
    assert kube("get", "pod", "-n", NS, "held-to-node1", "-o", "jsonpath={.status.phase}") == "Pending"
