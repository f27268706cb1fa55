"""Per-pod attribution end to end against the real API server (issue 15, part 5): the operator's
worker command, a real FUSE worker, pod records as the CSI plugin writes them, two readers in
two pod cgroups, and ``status.consumers`` on the Dataset."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from datahoard.csi_node import consumers as records
from tests.support.cgroups import pod_cgroups, read_in
from tests.support.cluster import Cluster
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE


@pytest.mark.integration  # runs a real FUSE worker: skipped without root and /dev/fuse
def test_status_lists_the_pods_that_read(cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
                                         node_names: dict[str, str], namespace: str,
                                         operator_env: dict[str, str], s3_server: Any, s3: Any,
                                         bucket: str) -> None:
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    a, b = os.urandom(200_000), os.urandom(80_000)
    s3.put_object(Bucket=bucket, Key="train/a.bin", Body=a)
    s3.put_object(Bucket=bucket, Key="train/b.bin", Body=b)
    cluster.apply_s3_dataset(namespace, "imagenet", f"s3://{bucket}/train/", s3_server.endpoint,
                             cache={"capacity": "1Gi"}, warm={"policy": "OnDemand"})  # reads fill the cache
    ds = eventually(lambda: cluster.daemonset(namespace, "imagenet"), what="the worker DaemonSet")
    host_root = Path(operator_env["DATAHOARD_HOST_ROOT"])
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    cmd = spec["containers"][0]["command"]
    assert cmd[cmd.index("--consumers-dir") + 1] == str(names.consumers_dir(namespace, "imagenet", host_root))

    # The CSI plugin's records for two training pods (tests/csi_node/test_consumer_records.py).
    for uid, pod in ((uid_a, "trainer-0"), (uid_b, "trainer-1")):
        records.record(host_root, namespace, "imagenet", f"/pods/{uid}/mount", {
            records.POD_UID: uid, records.POD_NAMESPACE: namespace, records.POD_NAME: pod})
    port = operator_env["DATAHOARD_STATS_PORT"]
    worker = kubelet.start_pod(ds, node_names["gpu-a"])
    kubelet.run_container(ds, f"127.0.0.1:{port}", host_root.with_name("worker.log"))
    kubelet.set_status(SYSTEM, worker, ready=True)

    mnt = names.mount_dir(namespace, "imagenet", host_root)
    with pod_cgroups(uid_a, uid_b) as (cg_a, cg_b):
        assert read_in(cg_a, mnt / "a.bin") == a  # a miss
        assert read_in(cg_a, mnt / "a.bin") == a  # a hit
        assert read_in(cg_b, mnt / "b.bin") == b  # a miss

    def listed() -> list[dict[str, Any]]:
        consumers = cluster.status(namespace, "imagenet").get("consumers")
        assert consumers == [
            {"namespace": namespace, "pod": "trainer-0", "bytes": 2 * len(a), "hitRatio": "0.500"},
            {"namespace": namespace, "pod": "trainer-1", "bytes": len(b), "hitRatio": "0.000"},
        ], consumers
        return consumers

    eventually(listed, what="status.consumers with both pods")
