"""The plugin records which pod a Dataset is published to (podInfoOnMount), over its real gRPC
socket with real bind mounts: one file per target in that Dataset's own directory, gone after
unpublish; the worker reads names from it (cache_worker/consumers.py). That the chart's
CSIDriver asks kubelet for pod info (podInfoOnMount) is checked in tests/chart/test_chart.py."""

from __future__ import annotations

import json

import pytest

from datahoard import names
from datahoard.cache_worker.consumers import ConsumerTable, Consumer, PidResolver, PodNames
from datahoard.csi_node.consumers import POD_NAME, POD_NAMESPACE, POD_UID
from tests.support.csi import Client

pytestmark = pytest.mark.integration

UID_A = "0f1b2c3d-4e5f-4678-9abc-def012345678"
UID_B = "11111111-2222-4333-8444-555555555555"


def pod_context(uid: str, name: str, namespace: str = "team-a") -> dict[str, str]:
    return {POD_UID: uid, POD_NAME: name, POD_NAMESPACE: namespace,
            "csi.storage.k8s.io/ephemeral": "false", "csi.storage.k8s.io/serviceAccount.name": "default"}


def records(directory) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in directory.glob("*.json")), key=lambda r: r["name"])


def test_publish_records_the_pod_and_unpublish_removes_it(client: Client, node, tiny_view):
    a, b = node.target("pod-a"), node.target("pod-b")
    client.publish(a, context=pod_context(UID_A, "trainer-0"))
    client.publish(b, context=pod_context(UID_B, "trainer-1"))
    client.publish(a, context=pod_context(UID_A, "trainer-0"))  # kubelet retries: idempotent
    mine = names.consumers_dir("ml", "imagenet", node.host_root)
    assert records(mine) == [
        {"uid": UID_A, "namespace": "team-a", "name": "trainer-0", "target": a},
        {"uid": UID_B, "namespace": "team-a", "name": "trainer-1", "target": b},
    ]
    # Nothing outside this Dataset's directory: another Dataset's worker mounts only its own.
    everything = sorted(p for p in (node.host_root / "consumers").rglob("*") if p.is_file())
    assert all(p.parent == mine for p in everything)

    # What the worker of ml/imagenet then shows for those pods' reads.
    class Pods(PidResolver):
        def resolve(self, pid: int) -> Consumer:
            return Consumer(UID_A if pid == 1 else UID_B)

    table = ConsumerTable(Pods(), PodNames(mine))
    table.add(1, 10, 0)
    table.add(2, 0, 5)
    assert [(c.namespace, c.pod) for c in table.snapshot()] == [("team-a", "trainer-0"), ("team-a", "trainer-1")]

    client.unpublish(a)
    assert [r["name"] for r in records(mine)] == ["trainer-1"]
    client.unpublish(a)  # again: still fine
    client.unpublish(b)
    assert records(mine) == []


def test_a_publish_without_pod_info_records_nothing(client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)  # a CSIDriver without podInfoOnMount
    assert not names.consumers_dir("ml", "imagenet", node.host_root).exists()
    client.publish(node.target("pod-x"), context={POD_UID: "../../etc", POD_NAME: "x", POD_NAMESPACE: "y"})
    assert not names.consumers_dir("ml", "imagenet", node.host_root).exists()

