"""Who reads, on a real node (issue 15, part 5; tests/cluster/test_operator_consumers.py is the
same against envtest with pod cgroups made by the test): two reader pods mount one Dataset's PVC,
the real kubelet puts them in their pod cgroups, the chart's CSI plugin records them at
NodePublishVolume (podInfoOnMount), and the worker pod (hostPID) attributes each FUSE request's
pid, and each open fanotify reports once the cache is complete, to its pod. ``status.consumers``
names both pods with the bytes each read, and the worker's ``/metrics`` has their series.

The Dataset warms on demand, so the pods' reads go both ways the worker counts them: misses and
hits through FUSE requests while it fills, then, once every file is cached (the worker then
stops answering opens and the kernel opens files itself), opens reported by fanotify.

Runs before test_user_path.py (file order): that module's last test uninstalls the chart.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from datahoard import names
from tests.support.nodekube import IMAGE, REPO, SYSTEM_NS, Kube, eventually

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

NS = "readers"
FILES = 60   # conftest.dataset_bucket

#: A reader pod's one process: on each /tmp/round-N it reads its files whole (the first
#: HALF of the sorted paths, or all of them) and checks every byte, then prints what it read and
#: waits for the next round. It stays alive, so the worker can always map its pid to the pod.
READER = """
import hashlib, os, sys, time
paths = sorted(os.path.join(d, n) for d, _, names in os.walk("/data") for n in names)
if os.environ["PART"] == "half":
    paths = paths[:len(paths) // 2]
print("ready", len(paths), flush=True)
for round in range(1, 100):
    while not os.path.exists(f"/tmp/round-{round}"):
        time.sleep(0.2)
    size = bad = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
        head, _, body = data.partition(b"\\n")
        bad += head[7:].decode() != hashlib.sha256(body).hexdigest()
        size += len(data)
    print(f"round {round}: {len(paths)} files {size} bytes {bad} bad", flush=True)
"""


def reader_pod(name: str, part: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "containers": [{"name": "reader", "image": IMAGE, "imagePullPolicy": "Never",
                                 "command": ["python3", "-c", READER], "env": [{"name": "PART", "value": part}],
                                 "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet",
                                                                        "readOnly": True}}]}})


@pytest.fixture(scope="module")
def readers(gpu_node: Kube, bridge_s3, dataset_bucket) -> Iterator[Kube]:
    """examples/dataset.yaml (endpoint adapted) warming on demand, and reader-a (the first half
    of the files) and reader-b (all of them) Running with its PVC."""
    kube = gpu_node
    kube("create", "namespace", NS)
    kube("apply", "-n", NS, "-f", str(REPO / "examples" / "s3-secret.yaml"))
    body = yaml.safe_load((REPO / "examples" / "dataset.yaml").read_text()
                          .replace("http://minio.minio:9000", bridge_s3.endpoint))
    body["spec"]["warm"]["policy"] = "OnDemand"   # nothing cached until the pods read
    kube.apply(yaml.safe_dump(body), namespace=NS)
    eventually(lambda: kube("get", "-n", NS, "dataset", "imagenet", "-o", "jsonpath={.status.phase}") == "Ready",
               300, "Dataset imagenet Ready")
    for name, part in (("reader-a", "half"), ("reader-b", "all")):
        kube.apply(reader_pod(name, part), namespace=NS)
    for name in ("reader-a", "reader-b"):
        kube("wait", "-n", NS, "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        eventually(lambda: "ready" in kube.logs("-n", NS, name), 60, f"{name} to list /data")
    yield kube
    kube("delete", "pod", "--all", "-n", NS, "--grace-period=1", "--wait=true", check=False, timeout=120)
    kube("delete", "dataset", "--all", "-n", NS, "--wait=true", check=False, timeout=300)
    kube("delete", "namespace", NS, "--wait=true", check=False, timeout=300)


def read_round(kube: Kube, pod: str, n: int) -> int:
    """Have ``pod`` read its files once more; the bytes it read."""
    kube("exec", "-n", NS, pod, "--", "touch", f"/tmp/round-{n}")
    line = eventually(lambda: re.search(rf"^round {n}: (\d+) files (\d+) bytes (\d+) bad$",
                                        kube.logs("-n", NS, pod), re.M), 120, f"{pod}'s round {n}")
    assert line.group(3) == "0", line.group(0)
    return int(line.group(2))


def worker_get(kube: Kube, path: str) -> str:
    """GET ``path`` from the Dataset's worker, at its pod IP (the host is on the pod bridge)."""
    key = names.worker_name(NS, "imagenet")   # the worker pods' datahoard.io/dataset label
    pods = kube.json("pods", "-n", SYSTEM_NS, "-l", f"datahoard.io/dataset={key}")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    port = pods[0]["spec"]["containers"][0]["ports"][0]["containerPort"]
    with urllib.request.urlopen(f"http://{pods[0]['status']['podIP']}:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def series(metrics: str, pod: str) -> dict[str, int]:
    """origin -> bytes of datahoard_consumer_served_bytes_total for (NS, pod)."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("datahoard_consumer_served_bytes_total{") and f'namespace="{NS}"' in line \
                and f'pod="{pod}"' in line:
            origin = re.search(r'origin="(\w+)"', line).group(1)
            out[origin] = int(float(line.rsplit(" ", 1)[1]))
    return out


def served_bytes(status: dict) -> int:
    """Bytes the Dataset's workers served, all nodes together."""
    return sum(int(n.get("servedBytes") or 0) for n in status.get("nodes") or [])


def test_status_and_metrics_name_the_pods_that_read(readers: Kube) -> None:
    kube = readers
    read = {"reader-a": 0, "reader-b": 0}
    read["reader-a"] += read_round(kube, "reader-a", 1)   # half the files: misses
    read["reader-b"] += read_round(kube, "reader-b", 1)   # all: that half hits, the rest misses
    half, total = read["reader-a"], read["reader-b"]
    assert 0 < half < total
    # Every file is cached now: the worker leaves opens to the kernel and counts them by fanotify.
    eventually(lambda: json.loads(worker_get(kube, "/stats"))["kernel_opens"], 60,
               "the worker to switch to kernel opens once every file is cached")
    read["reader-a"] += read_round(kube, "reader-a", 2)
    assert read["reader-a"] == 2 * half

    seen: list[object] = []

    def consumers() -> list[dict] | None:
        status = kube.json("dataset", "-n", NS, "imagenet").get("status") or {}
        seen[:] = [status.get("consumers"), served_bytes(status)]
        listed = status.get("consumers") or []
        if sum(c["bytes"] for c in listed) != sum(read.values()):
            return None
        return listed

    try:
        listed = eventually(consumers, 60, "status.consumers with every byte the pods read")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; pods read {read}; status consumers, servedBytes: {seen}") from None
    print("status.consumers:", listed, "pods read:", read)
    by_pod = {(c["namespace"], c["pod"]): c for c in listed}
    assert set(by_pod) == {(NS, "reader-a"), (NS, "reader-b")}, listed
    served = served_bytes(kube.json("dataset", "-n", NS, "imagenet")["status"])
    assert sum(c["bytes"] for c in listed) == served, (listed, served)
    # Whole files read whole: each pod is counted exactly what it read (the rule is "the whole
    # file at open", so a pod never gets more than it opened).
    for pod, n in read.items():
        assert by_pod[(NS, pod)]["bytes"] == n, (pod, by_pod, read)
    # reader-a: its first round missed, its second hit; reader-b hit reader-a's half.
    assert by_pod[(NS, "reader-a")]["hitRatio"] == "0.500", listed
    assert by_pod[(NS, "reader-b")]["hitRatio"] == f"{half / total:.3f}", listed

    metrics = worker_get(kube, "/metrics")
    for pod, n in read.items():
        got = series(metrics, pod)
        assert set(got) == {"cache", "source"} and sum(got.values()) == by_pod[(NS, pod)]["bytes"], (pod, got)
    assert series(metrics, "reader-a") == {"cache": half, "source": half}
