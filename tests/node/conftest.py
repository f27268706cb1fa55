"""The `node` tier: a real one-node cluster (tests/node/cluster.sh), brought up once per session.

Everything here is real: the kubelet runs pods in runc containers, the scheduler places them,
the kubelet calls the chart's CSI plugin, the operator runs as a pod. The S3 server (moto, over
HTTP) runs on the host's address on the pod bridge, the one place pods can reach.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

from tests.support.nodekube import (CLUSTER_SH, HOST_IP, NODE_DIR, REPO, SYSTEM_NS, TOOLS_DIR, Kube,
                                    eventually, missing_prerequisites)
from tests.support.ports import free_port
from tests.support.s3server import S3Server


def pytest_collection_modifyitems(config, items):
    reason = missing_prerequisites()
    for item in items:
        if "tests/node/" in str(item.fspath) and item.fspath.basename != "test_scripts.py":
            item.add_marker(pytest.mark.node)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"node tier {reason}"))


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[Kube]:
    """`cluster.sh up` once (building what is missing), `cluster.sh down` at the end; down fails
    the session's last test if it leaves a process, mount, netns, bridge or cgroup behind."""
    env = {**os.environ, "TOOLS_DIR": str(TOOLS_DIR)}
    up = subprocess.run([str(CLUSTER_SH), "up"], capture_output=True, text=True, env=env, timeout=3600)
    if up.returncode != 0:
        subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, env=env, timeout=300)
        pytest.fail(f"cluster.sh up failed:\n{up.stderr[-4000:]}")
    kube = Kube.from_env()
    yield kube
    down = subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, text=True, env=env, timeout=300)
    assert down.returncode == 0, f"cluster.sh down left things behind:\n{down.stderr[-3000:]}"


@pytest.fixture(scope="session")
def helm() -> str:
    return subprocess.run([str(REPO / "tests/tools/build-helm.sh"), str(TOOLS_DIR)], check=True,
                          capture_output=True, text=True, timeout=1800).stdout.strip()


@pytest.fixture(scope="session")
def bridge_s3() -> Iterator[S3Server]:
    """moto on the host's pod-bridge address: what the cache workers in pods read from."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST_IP, "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = S3Server(endpoint=f"http://{HOST_IP}:{port}", process=process)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                server.stop()
                raise RuntimeError(f"moto did not start on {server.endpoint}")
            time.sleep(0.2)
    yield server
    server.stop()


def synthetic_file(i: int, size: int) -> bytes:
    """The e2e's synthetic format: first line "DHE2E1 <sha256 of the rest>", checked by the readers
    in examples/job.yaml and examples/pytorchjob.yaml."""
    body = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
    body = body[:size]
    return b"DHE2E1 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


@pytest.fixture(scope="session")
def dataset_bucket(bridge_s3: S3Server) -> dict[str, int]:
    """s3://datasets/imagenet/train/: 60 synthetic .JPEG files of 20-200 KB (examples/dataset.yaml's
    source), plus one non-matching file the include filter must leave out."""
    s3 = boto3.client("s3", endpoint_url=bridge_s3.endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="datasets")
    sizes = {}
    for i in range(60):
        key = f"imagenet/train/n{i % 6:08d}/img_{i:04d}.JPEG"
        data = synthetic_file(i, 20_000 + (i * 3_001) % 180_000)
        s3.put_object(Bucket="datasets", Key=key, Body=data)
        sizes[key] = len(data)
    s3.put_object(Bucket="datasets", Key="imagenet/train/README.txt", Body=b"not an image\n")
    return sizes


RELEASE = "datahoard"


@pytest.fixture(scope="session")
def release(node_cluster: Kube, helm: str) -> Iterator[Kube]:
    """`helm install` of charts/datahoard for real, with tests/node/values.yaml (local images, the
    kubelet's root dir, self-registration); uninstalled at the end."""
    kube = node_cluster
    cmd = [helm, "install", RELEASE, str(REPO / "charts" / "datahoard"), "-n", SYSTEM_NS,
           "--create-namespace", "-f", str(REPO / "tests" / "node" / "values.yaml"),
           "--set", f"csiNode.kubeletDir={NODE_DIR}/var/kubelet",
           "--set", f"worker.hostRoot={NODE_DIR}/var/datahoard",
           "--wait", "--timeout", "5m"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=kube.env, timeout=400)
    if result.returncode != 0:
        pods = kube("get", "pods", "-A", "-o", "wide", check=False)
        events = kube("get", "events", "-A", check=False)
        pytest.fail(f"helm install failed:\n{result.stderr[-3000:]}\n{pods}\n{events[-4000:]}")
    yield kube
    subprocess.run([helm, "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "3m"],
                   capture_output=True, env=kube.env, timeout=240)


@pytest.fixture(scope="session")
def gpu_node(release: Kube) -> Kube:
    """Fake GPUs (an extended resource on the node's status), as the kind e2e does: the
    examples' Dataset placement (every node with allocatable nvidia.com/gpu) and their GPU
    limits then behave as on a GPU node."""
    kube = release
    kube("patch", "node", kube.node, "--subresource=status", "--type=json", "-p",
         '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]')
    eventually(lambda: kube("get", "node", kube.node, "-o",
                            r"jsonpath={.status.allocatable.nvidia\.com/gpu}") == "4", 60, "fake GPUs")
    return kube


@pytest.fixture(scope="session")
def training_operator(release: Kube) -> Kube:
    """The Kubeflow training-operator v1.8.1, built from its Go module, running in the cluster."""
    kube = release
    built = subprocess.run([str(REPO / "tests/tools/build-training-operator.sh"), str(TOOLS_DIR),
                            kube.kubectl], check=True, capture_output=True, text=True, timeout=1800).stdout.strip()
    subprocess.run([str(CLUSTER_SH), "import", f"{built}/training-operator.tar"],
                   check=True, capture_output=True, timeout=300)
    kube("apply", "--server-side", "-f", f"{built}/standalone.yaml", timeout=180)
    kube("-n", "kubeflow", "rollout", "status", "deploy/training-operator", "--timeout=300s", timeout=320)
    return kube
