"""The user's path on a real node, nothing faked: examples/dataset.yaml (only its endpoint changed,
to the S3 server on the host's bridge address), the operator schedules the worker on the node,
the PV/PVC bind, examples/job.yaml then examples/pytorchjob.yaml (the Kubeflow training-operator
v1.8.1, built from its Go module) read every file through the PVC and check every byte, and
`kubectl get datasets` shows the hit ratio those reads produced."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator

import pytest
from conftest import NODE_DIR, SYSTEM_NS
from nodekube import REPO, TOOLS_DIR, Kube, eventually

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]

NS = "ml"
FILES = 60   # conftest.dataset_bucket
IMAGE = "localhost/datahoard:dev"   # the readers run the product image: it has Python


def local_image(manifest: str) -> str:
    """The examples pull python:3.12-slim-bookworm; here there is no registry."""
    out, n = re.subn(r"^(\s*)image: python:3\.12-slim-bookworm$",
                     rf"\1image: {IMAGE}\n\1imagePullPolicy: Never", manifest, flags=re.M)
    assert n >= 1, "the example's reader image changed: update local_image()"
    return out


@pytest.fixture(scope="module")
def dataset(release: Kube, bridge_s3, dataset_bucket) -> Iterator[Kube]:
    kube = release
    # Fake GPUs (an extended resource), as the kind e2e does: the Dataset's default placement and
    # the examples' GPU limits then behave as on a GPU node.
    kube("patch", "node", kube.node, "--subresource=status", "--type=json", "-p",
         '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]')
    eventually(lambda: kube("get", "node", kube.node, "-o",
                            r"jsonpath={.status.allocatable.nvidia\.com/gpu}") == "4", 60, "fake GPUs")
    kube("create", "namespace", NS)
    text = (REPO / "examples" / "dataset.yaml").read_text()
    assert "endpoint: http://minio.minio:9000" in text
    kube("apply", "-n", NS, "-f", str(REPO / "examples" / "s3-secret.yaml"))
    kube.apply(text.replace("http://minio.minio:9000", bridge_s3.endpoint), namespace=NS)
    try:
        eventually(lambda: kube("get", "-n", NS, "dataset", "imagenet", "-o",
                                "jsonpath={.status.phase}") == "Ready", 600, "Dataset imagenet Ready")
    except AssertionError:
        print(kube("get", "-n", NS, "dataset", "imagenet", "-o", "yaml", check=False))
        print(kube("get", "pods", "-A", "-o", "wide", check=False))
        print(kube("logs", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=cache-worker", "--tail=50",
                   check=False))
        raise
    yield kube
    kube("delete", "pytorchjob,job", "--all", "-n", NS, "--wait=true", check=False, timeout=180)
    kube("delete", "-n", NS, "dataset", "imagenet", "--wait=true", check=False, timeout=300)
    kube("delete", "namespace", NS, "--wait=true", check=False, timeout=300)


def test_worker_on_the_node_and_pvc_bound(dataset: Kube) -> None:
    kube = dataset
    status = kube.json("dataset", "-n", NS, "imagenet")["status"]
    assert status["files"] == FILES, status   # README.txt is left out by the include filter
    workers = kube.json("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=cache-worker")["items"]
    assert [w["spec"]["nodeName"] for w in workers] == [kube.node], workers
    assert workers[0]["status"]["phase"] == "Running"
    eventually(lambda: kube("get", "-n", NS, "pvc", "imagenet", "-o", "jsonpath={.status.phase}") == "Bound",
               120, "PVC imagenet Bound")


def run_job(kube: Kube) -> str:
    kube("delete", "job", "read-imagenet", "-n", NS, "--ignore-not-found", "--wait=true", timeout=180)
    kube.apply(local_image((REPO / "examples" / "job.yaml").read_text()), namespace=NS)
    try:
        kube("wait", "-n", NS, "--for=condition=complete", "job/read-imagenet", "--timeout=300s", timeout=320)
    finally:
        logs = kube.logs("-n", NS, "job/read-imagenet")
    return logs


def test_job_reads_and_verifies_every_file_twice(dataset: Kube) -> None:
    kube = dataset
    for run in (1, 2):
        logs = run_job(kube)
        assert f"verified {FILES} files" in logs, f"run {run}: {logs}"
        pod = kube.json("pods", "-n", NS, "-l", "job-name=read-imagenet")["items"][0]
        assert pod["spec"]["nodeName"] == kube.node


def test_pytorchjob_reads_through_the_pvc(dataset: Kube) -> None:
    kube = dataset
    built = subprocess.run([str(REPO / "tests/tools/build-training-operator.sh"), str(TOOLS_DIR),
                            kube.kubectl], check=True, capture_output=True, text=True, timeout=1800).stdout.strip()
    subprocess.run([str(REPO / "tests/node/cluster.sh"), "import", f"{built}/training-operator.tar"],
                   check=True, capture_output=True, timeout=300)
    kube("apply", "--server-side", "-f", f"{built}/standalone.yaml", timeout=180)
    kube("-n", "kubeflow", "rollout", "status", "deploy/training-operator", "--timeout=300s", timeout=320)
    # Master only: there is no cluster DNS here, so a Worker could not resolve MASTER_ADDR.
    manifest = local_image((REPO / "examples" / "pytorchjob.yaml").read_text())
    manifest = manifest[:manifest.index("    Worker:")]
    # The validating webhook may refuse for a moment after the Deployment is available.
    eventually(lambda: kube.apply(manifest, namespace=NS), 120, "the PyTorchJob to be accepted", interval=5)
    eventually(lambda: kube("get", "-n", NS, "pytorchjob", "read-imagenet", "-o",
                            'jsonpath={.status.conditions[?(@.type=="Succeeded")].status}') == "True",
               600, "the PyTorchJob to succeed")
    logs = kube.logs("-n", NS, "read-imagenet-master-0")
    assert f"rank 0 on {kube.node}: verified {FILES} files" in logs, logs


def test_get_datasets_shows_the_real_hit_ratio(dataset: Kube) -> None:
    kube = dataset

    seen: list[dict[str, str]] = []

    def row() -> dict[str, str] | None:
        out = kube("get", "datasets", "-n", NS).splitlines()
        cols = re.split(r"\s{2,}", out[0].strip())
        values = dict(zip(cols, re.split(r"\s{2,}", out[1].strip())))
        seen[:] = [values]
        ratio = values.get("HIT RATIO", "")
        return values if re.fullmatch(r"[0-9.]+", ratio) and float(ratio) > 0.45 else None

    try:
        values = eventually(row, 60, "kubectl get datasets to show the hit ratio of the reads")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last row: {seen}") from None
    print("kubectl get datasets:", values)
    assert values["CACHED"] == "100.0%" and values["NODES"] == "1/1" and values["PHASE"] == "Ready", values


VERIFY = """
import hashlib, os, sys
files, bad = 0, []
for dirpath, _, names in os.walk("/data"):
    for name in names:
        data = open(os.path.join(dirpath, name), "rb").read()
        files += 1
        head, _, body = data.partition(b"\\n")
        if head[7:].decode() != hashlib.sha256(body).hexdigest():
            bad.append(name)
print(f"verified {files} files" if not bad else f"BAD {bad}")
"""

READER_POD = f"""
apiVersion: v1
kind: Pod
metadata: {{name: long-reader}}
spec:
  tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]
  containers:
    - name: reader
      image: {IMAGE}
      imagePullPolicy: Never
      command: ["sleep", "3600"]
      volumeMounts: [{{name: data, mountPath: /data, readOnly: true}}]
  volumes:
    - name: data
      persistentVolumeClaim: {{claimName: imagenet, readOnly: true}}
"""


@pytest.fixture(scope="module")
def reader(dataset: Kube) -> Iterator[Callable[[], str]]:
    """A long-running pod with the PVC mounted; calling the fixture reads and verifies every file
    in it (kubectl exec), through the mount it got when it started."""
    kube = dataset
    kube.apply(READER_POD, namespace=NS)
    kube("wait", "-n", NS, "--for=condition=Ready", "pod/long-reader", "--timeout=180s", timeout=200)
    yield lambda: kube("exec", "-n", NS, "long-reader", "--", "python3", "-c", VERIFY, timeout=120).strip()
    kube("delete", "pod", "-n", NS, "long-reader", "--grace-period=1", "--wait=true", check=False, timeout=120)


def test_csi_plugin_restart_keeps_published_volumes(dataset: Kube, reader) -> None:
    kube = dataset
    assert reader() == f"verified {FILES} files"
    sel = ["-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=csi-node"]
    old = kube("get", "pods", *sel, "-o", "name").strip()
    kube("delete", old, "-n", SYSTEM_NS, "--wait=true", timeout=120)
    assert reader() == f"verified {FILES} files"   # while the plugin is gone or starting
    new = eventually(lambda: (n := kube("get", "pods", *sel, "-o", "name").strip()) and n != old and n, 120,
                     "a new plugin pod")
    kube("wait", new, "-n", SYSTEM_NS, "--for=condition=Ready", "--timeout=180s", timeout=200)
    assert reader() == f"verified {FILES} files"
    assert "csi.datahoard.io" in eventually(
        lambda: kube("get", "csinode", kube.node, "-o", "jsonpath={.spec.drivers[*].name}"), 60, "re-registration")


def test_kubelet_restart_keeps_pod_volumes(dataset: Kube, reader) -> None:
    kube = dataset
    pod = kube.json("pod", "-n", NS, "long-reader")
    subprocess.run([str(REPO / "tests/node/cluster.sh"), "restart-kubelet"], check=True,
                   capture_output=True, timeout=200)
    eventually(lambda: kube("get", "node", kube.node, "-o",
                            'jsonpath={.status.conditions[?(@.type=="Ready")].status}') == "True", 120, "node Ready")
    # The first exec may meet the kubelet's API still starting (kubectl exec goes through it).
    assert eventually(reader, 90, "kubectl exec after the kubelet restart") == f"verified {FILES} files"
    after = kube.json("pod", "-n", NS, "long-reader")
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    # A new pod still gets the volume from the restarted kubelet.
    logs = run_job(kube)
    assert f"verified {FILES} files" in logs, logs


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path)]


def test_pvc_from_another_namespace_is_not_mounted(dataset: Kube) -> None:
    """A PVC is namespaced: a pod in another namespace naming `imagenet` gets no volume, and the
    scheduler says why in an Event; the Dataset's own volume is untouched."""
    kube = dataset
    kube("create", "namespace", "elsewhere")
    try:
        kube.apply(READER_POD, namespace="elsewhere")
        events = eventually(lambda: [e for e in kube.json("events", "-n", "elsewhere")["items"]
                                     if e["involvedObject"]["name"] == "long-reader"
                                     and 'persistentvolumeclaim "imagenet" not found' in e.get("message", "")],
                            120, "an Event saying the claim is not found")
        assert events[0]["reason"] == "FailedScheduling", events
        assert kube("get", "pod", "-n", "elsewhere", "long-reader", "-o", "jsonpath={.status.phase}") == "Pending"
    finally:
        kube("delete", "namespace", "elsewhere", "--wait=true", check=False, timeout=180)


def test_delete_waits_for_the_pod_using_it_then_uninstall_leaves_nothing(dataset: Kube, reader, helm: str) -> None:
    """Deleting a Dataset while a pod uses its PVC waits, with a condition naming the pod, and the
    pod keeps reading; once the pod is gone the deletion removes PV/PVC, worker, mounts and cache;
    `helm uninstall` then leaves no running pods and no mounts of ours (the CRD stays, on purpose)."""
    kube = dataset
    kube("delete", "pytorchjob,job", "--all", "-n", NS, "--wait=true", timeout=180)
    kube("delete", "-n", NS, "dataset", "imagenet", "--wait=false")
    cond = eventually(lambda: [c for c in kube.json("dataset", "-n", NS, "imagenet").get("status", {})
                               .get("conditions", []) if c.get("reason") == "VolumeInUse"],
                      120, "a VolumeInUse condition while long-reader uses the PVC")
    assert "long-reader" in cond[0]["message"], cond
    assert reader() == f"verified {FILES} files"
    kube("delete", "pod", "-n", NS, "long-reader", "--grace-period=1", "--wait=true", timeout=120)
    eventually(lambda: kube("get", "-n", NS, "dataset", "imagenet", "--ignore-not-found", "-o", "name") == "",
               300, "the Dataset's deletion to finish")
    for what in (["-n", NS, "pvc", "imagenet"], ["pv", f"datahoard-{NS}-imagenet"]):
        eventually(lambda: kube("get", *what, check=False, timeout=30) == "", 120, f"{what} gone")
    host_root = f"{NODE_DIR}/var/datahoard"
    eventually(lambda: not [m for m in mounts_under(host_root) if m != host_root], 180,
               f"no FUSE view left under {host_root}")
    eventually(lambda: not os.path.exists(f"{host_root}/cache/{NS}/imagenet"), 180, "the cache removed")
    subprocess.run([helm, "uninstall", "datahoard", "-n", SYSTEM_NS, "--wait", "--timeout", "3m"],
                   check=True, capture_output=True, env=kube.env, timeout=240)
    left: list[str] = []

    def no_pods() -> bool:
        left[:] = kube("get", "pods", "-n", SYSTEM_NS, "-o",
                       "custom-columns=NAME:.metadata.name,PHASE:.status.phase,OWNER:.metadata.ownerReferences[0].kind",
                       "--no-headers").splitlines()
        # The operator's cleanup Job (builders.py, ttlSecondsAfterFinished 600) is not part of the
        # release: its finished pod stays until the TTL controller removes it. Nothing runs.
        return not [p for p in left if not p.split()[1:] == ["Succeeded", "Job"]]

    try:
        eventually(no_pods, 180, "no pods left")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {left}") from None
    kubelet_pods = f"{NODE_DIR}/var/kubelet/pods"
    assert not [m for m in mounts_under(kubelet_pods) if "kubernetes.io~csi" in m], mounts_under(kubelet_pods)
    assert kube("get", "crd", "datasets.datahoard.io", "-o", "name").strip()
