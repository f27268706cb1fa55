"""A Dataset whose source the pod network cannot reach, on the real node: an endpoint on the
pod bridge with nothing listening (connection refused at once) and an address on the bridge
that nobody holds (every connect times out). What a user must get: the Dataset never claims to
be Ready, a condition says the workers are not ready within a bounded time, the worker's own
log names the endpoint and the error, nothing is mounted or labelled or bound on the node, and
deleting the Dataset removes everything it made. And the Dataset says why, where people look:
the worker's own error (refused; credentials rejected, 403) in WorkersReady and a Warning Event."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

from tests.support.nodekube import HOST_IP, NODE_DIR, REPO, SYSTEM_NS, Kube, eventually
from tests.support.ports import free_port
from tests.support.s3server import S3Server

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

NS = "unreachable"
#: What the operator may take to say the workers are not ready, and to finish a deletion.
BOUND = 180
ENDPOINTS = {
    # The host's bridge address, a port nobody listens on: ECONNREFUSED on every attempt.
    "refused": f"http://{HOST_IP}:9",
    # An address on the bridge that no host or pod holds: ARP gets no answer, connects time out.
    "blackholed": "http://10.244.0.250:9000",
}


def dataset_manifest(name: str, endpoint: str, node: str) -> str:
    return f"""
apiVersion: datahoard.io/v1alpha1
kind: Dataset
metadata: {{name: {name}}}
spec:
  source: {{uri: "s3://datasets/imagenet/train/", endpoint: "{endpoint}", region: us-east-1,
           secretRef: {{name: s3-creds}}}}
  placement: {{nodeSelector: {{kubernetes.io/hostname: "{node}"}}}}
"""


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path)]


@pytest.fixture(scope="module")
def cluster(release: Kube) -> Iterator[Kube]:
    """The namespace NS with examples/s3-secret.yaml in it (the credentials are never used)."""
    kube = release
    kube("create", "namespace", NS)
    kube("apply", "-n", NS, "-f", str(REPO / "examples" / "s3-secret.yaml"))
    yield kube
    kube("delete", "datasets", "--all", "-n", NS, "--wait=true", check=False, timeout=300)
    kube("delete", "namespace", NS, "--wait=true", check=False, timeout=300)


def workers_of(kube: Kube, name: str) -> list[dict]:
    """The Dataset's worker pods (the operator annotates them with <namespace>/<name>)."""
    pods = kube.json("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=cache-worker")["items"]
    return [p for p in pods if p["metadata"].get("annotations", {}).get("datahoard.io/dataset") == f"{NS}/{name}"]


def worker_logs(kube: Kube, name: str) -> str:
    out = []
    for p in workers_of(kube, name):
        out.append(kube.logs("-n", SYSTEM_NS, p["metadata"]["name"], "--tail=40"))
        out.append(kube.logs("-n", SYSTEM_NS, p["metadata"]["name"], "--previous", "--tail=40"))
    return "\n".join(out)


@pytest.mark.parametrize("how", sorted(ENDPOINTS))
def test_unreachable_source_is_reported_and_cleaned_up(cluster: Kube, how: str) -> None:
    kube = cluster
    name = f"nowhere-{how}"
    endpoint = ENDPOINTS[how]
    kube.apply(dataset_manifest(name, endpoint, kube.node), namespace=NS)

    def not_ready_condition() -> dict | None:
        status = kube.json("dataset", "-n", NS, name).get("status", {})
        conds = [c for c in status.get("conditions", []) if c["type"] == "WorkersReady" and c["status"] == "False"]
        return conds[0] if conds else None

    cond = eventually(not_ready_condition, BOUND, "WorkersReady=False on the Dataset")
    # The worker tries, fails and says why, naming the endpoint (in this or its last run's log).
    address = endpoint.split("//")[1]

    def log_naming_the_endpoint() -> str | None:
        text = worker_logs(kube, name)
        return text if address in text else None

    logs = eventually(log_naming_the_endpoint, BOUND, f"the worker's log to name {address}")
    status = kube.json("dataset", "-n", NS, name)["status"]
    events = [e for e in kube.json("events", "-n", NS)["items"] if e["involvedObject"]["name"] == name]
    print(f"{how}: phase {status.get('phase')}; WorkersReady: {cond['reason']}: {cond['message']}")
    print(f"{how}: Dataset events: {[(e['reason'], e['message']) for e in events]}")
    print(f"{how}: worker log tail:\n{logs[-1500:]}")
    assert status.get("phase") != "Ready", status
    # Once the worker has failed (it exits after its bounded retries), its only worker failing
    # makes the Dataset Failed, not Listing as if busy.
    eventually(lambda: kube.json("dataset", "-n", NS, name)["status"].get("phase") == "Failed", BOUND,
               "phase Failed")
    # Nothing a pod could use: no label on the node, no PV, no FUSE view.
    label = f"dataset.datahoard.io/{NS}.{name}"
    assert label not in kube.json("node", kube.node)["metadata"]["labels"]
    assert kube("get", "pvc", "-n", NS, name, "--ignore-not-found", "-o", "name") == ""
    view = f"{NODE_DIR}/var/datahoard/mnt/{NS}/{name}"
    assert mounts_under(view) == [], mounts_under(view)

    kube("delete", "dataset", name, "-n", NS, "--wait=false")
    eventually(lambda: kube("get", "-n", NS, "dataset", name, "--ignore-not-found", "-o", "name") == "",
               BOUND, f"the deletion of {name} to finish")
    eventually(lambda: workers_of(kube, name) == [], BOUND, "the worker pods gone")
    eventually(lambda: mounts_under(view) == [], BOUND, f"no mount left at {view}")
    eventually(lambda: not os.path.exists(f"{NODE_DIR}/var/datahoard/cache/{NS}/{name}"), BOUND,
               "the cache directory removed")


@pytest.fixture(scope="module")
def checking_s3(cluster: Kube) -> Iterator[str]:
    """moto on the host's bridge address that checks credentials after its first request (which
    makes the bucket): the Secret's keys, unknown to it, get 403 InvalidAccessKeyId."""
    port = free_port()
    server = S3Server(endpoint=f"http://{HOST_IP}:{port}", process=subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST_IP, "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        eventually(lambda: server.process.poll() is None and _answers(server.endpoint), 30,
                   f"moto at {server.endpoint}", interval=0.2)
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(
            Bucket="datasets")
        yield server.endpoint
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("how", ["refused", "blackholed", "bad-credentials"])
def test_unreachable_source_condition_says_why(cluster: Kube, checking_s3: str, how: str) -> None:
    """The worker's fatal error reaches `kubectl describe dataset`: the kubelet puts the
    worker's termination message in the pod's status, the operator copies it into WorkersReady
    (reason WorkerFailing) and posts it as a Warning Event."""
    kube = cluster
    name = f"nowhere-why-{how}"
    endpoint = ENDPOINTS.get(how) or checking_s3
    kube.apply(dataset_manifest(name, endpoint, kube.node), namespace=NS)
    expected = {
        "refused": f"cannot reach S3 endpoint {endpoint} for s3://datasets/imagenet/train/: "
                   "connection refused",
        # ARP gets no answer: the connect fails with EHOSTUNREACH after ~3 s (measured), or
        # times out where the kernel keeps trying longer.
        "blackholed": f"cannot reach S3 endpoint {endpoint} for s3://datasets/imagenet/train/: ",
        "bad-credentials": "S3 rejected the credentials for s3://datasets/imagenet/train/: "
                           "InvalidAccessKeyId",
    }[how]
    try:
        def says_why() -> dict | None:
            status = kube.json("dataset", "-n", NS, name).get("status", {})
            conds = [c for c in status.get("conditions", []) if c["type"] == "WorkersReady"
                     and c["status"] == "False" and c["reason"] == "WorkerFailing"]
            return conds[0] if conds else None

        # The worker gives up within a second (refused, rejected) or ~20 s (5 attempts at an
        # address nobody holds) of starting: 180 s is several crash-loop rounds and passes.
        cond = eventually(says_why, 180, "WorkersReady=False, reason WorkerFailing")
        print(f"{how}: WorkersReady: {cond['reason']}: {cond['message']}")
        assert cond["message"].startswith(f"{kube.node}: {expected}"), cond
        assert "(worker restarted " in cond["message"] or cond["message"].endswith("(worker exited)")
        if how == "blackholed":
            assert "no route to host" in cond["message"] or "connect timed out" in cond["message"]

        def warning() -> list[str] | None:
            events = [e["message"] for e in kube.json("events", "-n", NS)["items"]
                      if e["involvedObject"]["name"] == name and e["type"] == "Warning"
                      and e["reason"] == "WorkerFailing"]
            return events or None

        events = eventually(warning, 60, "a Warning Event WorkerFailing")
        print(f"{how}: Warning Events: {events}")
        assert expected in events[0]
        described = kube("describe", "dataset", "-n", NS, name)
        print(f"{how}: kubectl describe dataset (tail):\n{described[-1500:]}")
        assert "WorkerFailing" in described and endpoint.split("//")[1] in described
    finally:
        kube("delete", "dataset", name, "-n", NS, "--wait=true", check=False, timeout=BOUND)
