"""A worker that cannot list its source says why on the Dataset (issue 14), against the real API
server, the real operator and the real worker command.

The worker pod the operator builds carries a termination message path and the policy to fall
back to the log's tail; the worker, run here with the container's command and environment,
fails against a source that refuses connections or rejects its credentials and writes its
error there. The test then plays the kubelet: it puts that file's text into the pod's
``lastState.terminated.message`` with a crash-loop back-off, exactly where a kubelet puts it.
The operator must copy it into WorkersReady with a reason that becomes a Warning Event.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from tests.support.cluster import Cluster
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.s3server import S3Server, start_moto

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE


@pytest.fixture
def checking_s3() -> Iterator[S3Server]:
    """A moto server that checks credentials after its first request (which makes the bucket)."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    server.client().create_bucket(Bucket="datasets")
    yield server
    server.stop()


def run_worker_to_its_end(kubelet: Kubelet, ds: dict[str, Any], message_file: Path,
                          log: Path) -> subprocess.CompletedProcess:
    """The worker container's command and env, as the kubelet would start it, with the
    termination message redirected from the container's path to ``message_file``."""
    container = ds["spec"]["template"]["spec"]["containers"][0]
    cmd = list(container["command"])
    assert cmd[0] == "datahoard", cmd
    cmd[cmd.index("--stats-addr") + 1] = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(kubelet.container_env(ds["metadata"]["namespace"], container))
    assert env["DATAHOARD_TERMINATION_LOG"] == container["terminationMessagePath"]
    env["DATAHOARD_TERMINATION_LOG"] = str(message_file)
    # Bounded by the worker's own retry budget against a refused or rejecting endpoint.
    env.update(DATAHOARD_S3_MAX_ATTEMPTS="2")
    with log.open("ab") as out:
        return subprocess.run([sys.executable, "-m", "datahoard.cli", *cmd[1:]], env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=120)


@pytest.mark.integration  # runs the real worker command: skipped without root and /dev/fuse
@pytest.mark.parametrize("how", ["refused", "bad-credentials"])
def test_a_crash_looping_worker_says_why_on_the_dataset(
        how: str, cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
        node_names: dict[str, str], namespace: str, operator_env: dict[str, str],
        checking_s3: S3Server, tmp_path: Path) -> None:
    node = node_names["gpu-a"]
    endpoint = f"http://127.0.0.1:{free_port()}" if how == "refused" else checking_s3.endpoint
    cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "nope"}})
    cluster.apply_dataset(namespace, "nowhere", {
        "source": {"uri": "s3://datasets/train/", "endpoint": endpoint, "region": "us-east-1",
                   "secretRef": {"name": "s3-creds"}},
        "placement": {"nodeSelector": {"kubernetes.io/hostname": node}}})
    ds = eventually(lambda: cluster.daemonset(namespace, "nowhere"), what="the worker DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert (container["terminationMessagePath"], container["terminationMessagePolicy"]) == (
        "/dev/termination-log", "FallbackToLogsOnError")

    message_file = tmp_path / "termination-log"
    done = run_worker_to_its_end(kubelet, ds, message_file, tmp_path / "worker.log")
    written = message_file.read_text()
    print(f"worker exited {done.returncode}; termination message: {written!r}")
    assert done.returncode == 1, (tmp_path / "worker.log").read_text()
    expected = (f"cannot reach S3 endpoint {endpoint} for s3://datasets/train/: connection refused"
                if how == "refused" else "S3 rejected the credentials for s3://datasets/train/: "
                "InvalidAccessKeyId")
    assert written.startswith(expected) and len(written.encode()) <= 4096

    # The kubelet's part: the pod, its container exited three times, now backing off.
    pod = kubelet.start_pod(ds, node)
    cluster.core.patch_namespaced_pod_status(pod, SYSTEM, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{
            "name": "worker", "image": container["image"], "imageID": "", "ready": False,
            "restartCount": 3, "started": False,
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                                  "message": f"back-off 40s restarting failed container=worker pod={pod}"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": written,
                                         "startedAt": "2026-12-06T02:31:07Z",
                                         "finishedAt": "2026-12-06T02:31:09Z"}}}]}})

    def says_why() -> dict[str, Any]:
        cond = cluster.condition(namespace, "nowhere", "WorkersReady")
        assert cond.get("reason") == "WorkerFailing", cond
        return cond

    cond = eventually(says_why, what="WorkersReady to say why the worker fails")
    print(f"WorkersReady: {cond['reason']}: {cond['message']}")
    assert cond["status"] == "False"
    assert cond["message"] == f"{node}: {written.strip()} (worker restarted 3 times)"
    eventually(lambda: any(t == "Warning" and r == "WorkerFailing" and expected in m
                           for t, r, m in cluster.events(namespace, "nowhere")),
               what="a Warning Event naming the failure")
    # Its only worker fails: the Dataset is Failed (not Listing, as if busy), until it gets up.
    assert cluster.status(namespace, "nowhere").get("phase") == "Failed"
