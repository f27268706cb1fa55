"""The operator's converge and finalize passes against the in-memory Kubernetes API
(tests/support/fakes/kube.py, whose contract with Kube on a real API server is checked in
tests/cluster/test_kube_contract.py): no envtest, no Go, no network.

Pinned here: what one pass writes in each state (workers, labels, volumes, credentials), that
a second pass over an unchanged world writes nothing, that objects of someone else are never
written or deleted, that API failures surface as retryable errors, and the order finalize
tears things down in, waiting while pods still use the volume or workers still run.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import kopf
import pytest

from datahoard import names
from datahoard.api import Dataset
from datahoard.operator import labels, ownership, volumes
from datahoard.operator.config import OperatorSettings
from datahoard.operator.converge import converge
from datahoard.operator.finalize import Blocked, finalize
from datahoard.operator.labels import worker_selector
from tests.support.fakes.kube import FakeKube

GPU = "nvidia.com/gpu"
UID = "11111111-2222-3333-4444-555555555555"
SYSTEM = names.SYSTEM_NAMESPACE


def body(**source: Any) -> dict[str, Any]:
    return {"apiVersion": "datahoard.io/v1alpha1", "kind": "Dataset",
            "metadata": {"namespace": "ml", "name": "imagenet", "uid": UID, "generation": 1},
            "spec": {"source": {"uri": "s3://bucket/train", **source}}}


def node(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": []}, "status": {"allocatable": {GPU: "8"}}}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for var in list(os.environ):
        if var.startswith("DATAHOARD_"):
            monkeypatch.delenv(var)
    return OperatorSettings()


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube(namespaces=("ml", SYSTEM))
    for name in ("gpu-a", "gpu-b"):
        fake.add({"kind": "Node", **node(name)})
    return fake


@pytest.fixture
def ds() -> Dataset:
    return Dataset.from_body(body())


def worker_pod(kube: FakeKube, ds: Dataset, on: str, ready: bool = True) -> None:
    kube.add({"kind": "Pod", "metadata": {
        "name": f"{labels.dataset_key(ds)}-{on}", "namespace": SYSTEM,
        "labels": dict(part.split("=") for part in worker_selector(ds).split(","))},
        "spec": {"nodeName": on, "containers": [{"name": "worker", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


def conditions(result) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result.conditions.items}


def versions(kube: FakeKube) -> dict[tuple[str, str], str]:
    return {(kind, o["metadata"]["name"]): o["metadata"]["resourceVersion"]
            for kind in ("Node", "DaemonSet", "Secret", "PersistentVolume", "PersistentVolumeClaim", "Job")
            for o in kube.all(kind)}


def pass_once(ds: Dataset, kube: FakeKube, settings: OperatorSettings, nodes=("gpu-a", "gpu-b"),
              status: dict | None = None):
    return converge(ds, status or {}, [node(n) for n in nodes], kube, settings)


def test_first_pass_starts_workers_and_waits_for_one_before_the_volume(ds, kube, settings):
    result = pass_once(ds, kube, settings)
    assert result.selected == ["gpu-a", "gpu-b"]
    daemonset = kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM)
    assert daemonset is not None
    assert ownership.verdict(daemonset, ds) == "ours"
    assert kube.all("PersistentVolume") == [] and kube.all("PersistentVolumeClaim") == []
    assert kube.nodes_with_label(names.node_label("ml", "imagenet")) == []
    conds = conditions(result)
    assert conds["VolumeReady"] == ("False", "WaitingForWorker")
    assert conds["CredentialsReady"] == ("True", "Anonymous")
    assert conds["ObjectsOwned"] == ("True", "Owned")


def test_a_ready_worker_labels_its_node_and_brings_the_volume(ds, kube, settings):
    pass_once(ds, kube, settings)
    worker_pod(kube, ds, "gpu-a")
    worker_pod(kube, ds, "gpu-b", ready=False)
    result = pass_once(ds, kube, settings)
    assert kube.nodes_with_label(names.node_label("ml", "imagenet")) == ["gpu-a"]
    pv = kube.get("PersistentVolume", names.pv_name("ml", "imagenet"))
    pvc = kube.get("PersistentVolumeClaim", "imagenet", "ml")
    assert pv is not None and pvc is not None and pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert conditions(result)["VolumeReady"] == ("True", "Bound")


def test_a_second_pass_over_an_unchanged_world_writes_nothing(ds, kube, settings):
    pass_once(ds, kube, settings)
    worker_pod(kube, ds, "gpu-a")
    status = {"cacheNodes": pass_once(ds, kube, settings).cache_nodes}
    before = versions(kube)
    pass_once(ds, kube, settings, status=status)
    assert versions(kube) == before


def test_a_node_no_longer_selected_loses_its_label_and_no_node_stops_the_workers(ds, kube, settings):
    pass_once(ds, kube, settings)
    worker_pod(kube, ds, "gpu-a")
    pass_once(ds, kube, settings)
    assert kube.nodes_with_label(names.node_label("ml", "imagenet")) == ["gpu-a"]
    result = pass_once(ds, kube, settings, nodes=("gpu-b",))
    assert kube.nodes_with_label(names.node_label("ml", "imagenet")) == []
    assert result.selected == ["gpu-b"]
    result = pass_once(ds, kube, settings, nodes=())
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) is None
    assert conditions(result)["NodesSelected"] == ("False", "NoMatchingNodes")
    assert kube.get("PersistentVolume", names.pv_name("ml", "imagenet")) is not None  # caches stay


def test_credentials_are_copied_only_when_complete(kube, settings):
    ds = Dataset.from_body(body(secretRef={"name": "s3-creds"}))
    result = pass_once(ds, kube, settings)
    assert conditions(result)["CredentialsReady"] == ("False", "SecretNotFound")
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) is None  # no worker without them

    encode = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    kube.add({"kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "ml"},
              "data": {"AWS_ACCESS_KEY_ID": encode("id")}})
    assert conditions(pass_once(ds, kube, settings))["CredentialsReady"] == ("False", "SecretKeyMissing")

    kube.update("Secret", "s3-creds", "ml", {"data": {"AWS_SECRET_ACCESS_KEY": encode("key"),
                                                      "UNRELATED": encode("x")}})
    result = pass_once(ds, kube, settings)
    assert conditions(result)["CredentialsReady"] == ("True", "SecretCopied")
    copy = kube.get("Secret", names.worker_name("ml", "imagenet"), SYSTEM)
    assert set(copy["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) is not None


def test_someone_elses_daemonset_of_that_name_is_left_alone(ds, kube, settings):
    foreign = {"kind": "DaemonSet", "metadata": {
        "name": labels.dataset_key(ds), "namespace": SYSTEM,
        "annotations": {ownership.UID_ANNOTATION: "another-dataset"}}, "spec": {"x": 1}}
    kube.add(foreign)
    before = kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM)
    result = pass_once(ds, kube, settings)
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) == before
    assert conditions(result)["ObjectsOwned"] == ("False", "NameConflict")
    pass_once(ds, kube, settings, nodes=())  # and never deleted either
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) == before


def test_an_api_failure_is_a_retryable_error(ds, kube, settings):
    kube.fail_next()
    with pytest.raises(kopf.TemporaryError, match="unreachable"):
        pass_once(ds, kube, settings)


def ready_world(ds: Dataset, kube: FakeKube, settings: OperatorSettings) -> dict[str, Any]:
    pass_once(ds, kube, settings)
    worker_pod(kube, ds, "gpu-a")
    worker_pod(kube, ds, "gpu-b")
    result = pass_once(ds, kube, settings)
    return {**body(), "status": {"cacheNodes": result.cache_nodes}}


def test_finalize_waits_for_pods_using_the_volume(ds, kube, settings):
    dataset = ready_world(ds, kube, settings)
    kube.add({"kind": "Pod", "metadata": {"name": "trainer", "namespace": "ml"},
              "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "imagenet"}}]},
              "status": {"phase": "Running"}})
    before = versions(kube)
    with pytest.raises(Blocked) as info:
        finalize(dataset, kube, settings)
    assert info.value.reason == "VolumeInUse" and "trainer" in info.value.message
    assert versions(kube) == before  # nothing touched while the volume is in use


def test_finalize_removes_everything_in_order_and_is_idempotent(ds, kube, settings):
    dataset = ready_world(ds, kube, settings)
    with pytest.raises(Blocked) as info:
        finalize(dataset, kube, settings)
    assert info.value.reason == "WorkersStopping"
    assert kube.all("PersistentVolumeClaim") == [] and kube.all("PersistentVolume") == []
    assert kube.nodes_with_label(names.node_label("ml", "imagenet")) == []
    assert kube.get("DaemonSet", labels.dataset_key(ds), SYSTEM) is None
    assert kube.all("Job") == []  # no cleanup while workers may still hold the cache

    for pod in kube.list_pods(SYSTEM, worker_selector(ds)):  # the DaemonSet's pods exit
        kube.remove("Pod", pod["metadata"]["name"], SYSTEM)
    finalize(dataset, kube, settings)
    jobs = kube.all("Job")
    assert sorted(j["spec"]["template"]["spec"]["nodeName"] for j in jobs) == ["gpu-a", "gpu-b"]
    finalize(dataset, kube, settings)  # again: nothing new, no error
    assert len(kube.all("Job")) == 2


def test_finalize_leaves_someone_elses_volume_alone(ds, kube, settings):
    foreign = volumes.persistent_volume(ds, settings)
    foreign["metadata"]["annotations"] = {ownership.UID_ANNOTATION: "someone-else"}
    kube.create(foreign)
    finalize({**body(), "status": {}}, kube, settings)
    assert kube.get("PersistentVolume", names.pv_name("ml", "imagenet")) is not None
