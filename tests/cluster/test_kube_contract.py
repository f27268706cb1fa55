"""The Kube contract, run against the in-memory FakeKube and against the operator's Kube on a
real kube-apiserver (envtest, marked cluster): what converge/finalize's unit tests get from the
fake, the API server gives too.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes
import pytest

from datahoard.operator.kube import Kube
from tests.support.fakes.kube import FakeKube
from tests.support.ports import free_port

Obj = dict[str, Any]


@dataclass
class Api:
    kube: Any  # Kube or FakeKube
    namespace: str
    add: Callable[[Obj], None]  # as kubectl create would
    get: Callable[[str, str, str | None], Obj | None]  # the whole stored object
    unreachable: Callable[[], Any]  # a Kube whose next call finds no API server


def _fake_api() -> Api:
    fake = FakeKube(namespaces=("contract",))

    def unreachable() -> FakeKube:
        fake.fail_next()
        return fake

    return Api(fake, "contract", fake.add, fake.get, unreachable)


def _real_api(request: pytest.FixtureRequest) -> Api:
    client: kubernetes.client.ApiClient = request.getfixturevalue("api_client")
    namespace: str = request.getfixturevalue("namespace")
    core, apps = kubernetes.client.CoreV1Api(client), kubernetes.client.AppsV1Api(client)

    def add(obj: Obj) -> None:
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        {"Node": lambda: core.create_node(obj),
         "Pod": lambda: core.create_namespaced_pod(ns, obj),
         "Secret": lambda: core.create_namespaced_secret(ns, obj),
         "PersistentVolume": lambda: core.create_persistent_volume(obj)}[kind]()

    def get(kind: str, name: str, ns: str | None = None) -> Obj | None:
        read = {"Node": lambda: core.read_node(name),
                "Pod": lambda: core.read_namespaced_pod(name, ns),
                "Secret": lambda: core.read_namespaced_secret(name, ns),
                "DaemonSet": lambda: apps.read_namespaced_daemon_set(name, ns),
                "PersistentVolume": lambda: core.read_persistent_volume(name),
                "PersistentVolumeClaim": lambda: core.read_namespaced_persistent_volume_claim(name, ns)}
        try:
            return client.sanitize_for_serialization(read[kind]())
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def unreachable() -> Kube:
        config = kubernetes.client.Configuration()
        config.host = f"https://127.0.0.1:{free_port()}"
        return Kube(kubernetes.client.ApiClient(config))

    return Api(Kube(client), namespace, add, get, unreachable)


@pytest.fixture(params=["fake", pytest.param("envtest", marks=pytest.mark.cluster)])
def api(request: pytest.FixtureRequest) -> Api:
    return _fake_api() if request.param == "fake" else _real_api(request)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def secret(api: Api, name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": api.namespace, "labels": labels or {}},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def pv(name: str, finalizers: list[str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, **({"finalizers": finalizers} if finalizers else {})},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "csi": {"driver": "datahoard.io", "volumeHandle": name}}}


def pod(api: Api, name: str, labels: dict[str, str] | None = None, claim: str | None = None,
        gates: list[str] | None = None) -> Obj:
    spec: Obj = {"containers": [{"name": "c", "image": "busybox"}]}
    if claim:
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    if gates:
        spec["schedulingGates"] = [{"name": g} for g in gates]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": api.namespace, "labels": labels or {}},
            "spec": spec}


def test_reads_of_missing_objects_are_none(api):
    assert api.kube.read("PersistentVolume", unique("pv")) is None
    assert api.kube.read("Secret", "missing", api.namespace) is None
    assert api.kube.read_secret_data(api.namespace, "missing") is None


def test_create_is_idempotent_and_the_server_assigns_identity(api):
    name = unique("pv")
    assert api.kube.create(pv(name)) is True
    assert api.kube.create(pv(name)) is False  # 409: exists
    got = api.kube.read("PersistentVolume", name)
    assert got["kind"] == "PersistentVolume" and got["metadata"]["name"] == name
    assert got["metadata"]["uid"] and got["metadata"]["resourceVersion"]
    assert got["metadata"]["creationTimestamp"]
    assert got["spec"]["csi"]["volumeHandle"] == name


def test_delete_is_idempotent_and_pinned_to_the_uid(api):
    name = unique("pv")
    api.kube.create(pv(name))
    uid = api.kube.read("PersistentVolume", name)["metadata"]["uid"]
    api.kube.delete("PersistentVolume", name, uid=str(uuid.uuid4()))  # 409: another object
    assert api.kube.read("PersistentVolume", name) is not None
    api.kube.delete("PersistentVolume", name, uid=uid)
    assert api.kube.read("PersistentVolume", name) is None
    api.kube.delete("PersistentVolume", name)  # 404: success
    api.kube.delete("Secret", "never-there", api.namespace)


def test_delete_of_an_object_with_finalizers_only_marks_it(api):
    name = unique("pv")
    api.kube.create(pv(name, finalizers=["example.com/hold"]))
    api.kube.delete("PersistentVolume", name)
    got = api.kube.read("PersistentVolume", name)
    assert got is not None and got["metadata"]["deletionTimestamp"]
    assert got["metadata"]["finalizers"] == ["example.com/hold"]


def test_secret_reads_give_data_only_where_asked(api):
    api.add(secret(api, "creds", {"AWS_ACCESS_KEY_ID": "id"}))
    assert api.kube.read_secret_data(api.namespace, "creds") == {
        "AWS_ACCESS_KEY_ID": base64.b64encode(b"id").decode()}
    assert "data" not in api.kube.read("Secret", "creds", api.namespace)


def test_server_side_apply_creates_converges_and_drops_what_it_stopped_setting(api):
    api.kube.apply(secret(api, "copy", {"a": "1"}, labels={"mine": "x", "old": "y"}))
    first = api.get("Secret", "copy", api.namespace)
    assert first["metadata"]["labels"] == {"mine": "x", "old": "y"}
    api.kube.apply(secret(api, "copy", {"a": "1"}, labels={"mine": "x", "old": "y"}))
    again = api.get("Secret", "copy", api.namespace)
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]  # no-op
    api.kube.apply(secret(api, "copy", {"a": "2"}, labels={"mine": "x"}))
    now = api.get("Secret", "copy", api.namespace)
    assert now["metadata"]["labels"] == {"mine": "x"}
    assert now["data"] == {"a": base64.b64encode(b"2").decode()}
    assert now["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    assert now["metadata"]["uid"] == first["metadata"]["uid"]


def test_a_write_with_a_stale_resource_version_is_a_conflict(api):
    api.kube.apply(secret(api, "copy", {"a": "1"}))
    stale = secret(api, "copy", {"a": "2"})
    current = api.get("Secret", "copy", api.namespace)["metadata"]["resourceVersion"]
    api.kube.apply(secret(api, "copy", {"a": "3"}))
    stale["metadata"]["resourceVersion"] = current
    with pytest.raises(kopf.TemporaryError, match="apply failed: 409 Conflict"):
        api.kube.apply(stale)


def test_a_namespaced_object_in_a_missing_namespace_is_an_api_error(api):
    missing = secret(api, "x", {"a": "1"})
    missing["metadata"]["namespace"] = unique("nope")
    with pytest.raises(kopf.TemporaryError, match="apply failed: 404 Not Found"):
        api.kube.apply(missing)


def test_node_labels_are_merge_patched(api):
    node = unique("node")
    label = f"datahoard.io/{unique('ds')}"
    api.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"keep": "1"}}})
    api.kube.patch_node(node, {"metadata": {"labels": {label: "true"}}})
    assert api.kube.nodes_with_label(label) == [node]
    api.kube.patch_node(node, {"metadata": {"labels": {label: None}}})
    assert api.kube.nodes_with_label(label) == []
    assert api.get("Node", node, None)["metadata"]["labels"] == {"keep": "1"}
    api.kube.patch_node(unique("gone"), {"metadata": {"labels": {label: "true"}}})  # 404: fine


def test_pod_patches_are_pinned_to_the_uid(api):
    api.add(pod(api, "gated", gates=["datahoard.io/warm", "other.io/gate"]))
    uid = api.get("Pod", "gated", api.namespace)["metadata"]["uid"]
    ungate = {"metadata": {"uid": uid},
              "spec": {"schedulingGates": [{"name": "datahoard.io/warm", "$patch": "delete"}]}}
    assert api.kube.patch_pod(api.namespace, "missing", ungate) is False
    wrong = {**ungate, "metadata": {"uid": str(uuid.uuid4())}}
    assert api.kube.patch_pod(api.namespace, "gated", wrong) is False
    assert len(api.get("Pod", "gated", api.namespace)["spec"]["schedulingGates"]) == 2
    assert api.kube.patch_pod(api.namespace, "gated", ungate) is True
    assert api.get("Pod", "gated", api.namespace)["spec"]["schedulingGates"] == [{"name": "other.io/gate"}]


def test_pods_are_listed_by_selector_and_by_claim(api):
    api.add(pod(api, "w1", labels={"app": "w", "tier": "cache"}))
    api.add(pod(api, "w2", labels={"app": "w"}))
    api.add(pod(api, "user", claim="data"))
    api.add(pod(api, "other", claim="elsewhere"))
    assert sorted(p["metadata"]["name"] for p in api.kube.list_pods(api.namespace, "app=w")) == ["w1", "w2"]
    assert [p["metadata"]["name"] for p in api.kube.list_pods(api.namespace, "app=w,tier=cache")] == ["w1"]
    assert api.kube.pods_using_claim(api.namespace, "data") == ["user"]


def test_an_unreachable_api_server_is_a_temporary_error(api):
    kube = api.unreachable()
    with pytest.raises(kopf.TemporaryError, match="Kubernetes API unreachable during nodes_with_label"):
        kube.nodes_with_label("x")


#: Every kind the operator could ask about; the real Kube dispatches on some of them per method.
CANDIDATE_KINDS = ("PersistentVolume", "PersistentVolumeClaim", "DaemonSet", "Secret", "Job",
                   "ConfigMap", "NetworkPolicy", "Pod", "Node", "Service")


def _taken(call) -> bool:
    """Whether the Kube method took the kind: refused kinds raise KeyError/ValueError before any
    request; taken ones reach the (unreachable) server or the fake."""
    try:
        call()
    except (KeyError, ValueError):
        return False
    except kopf.TemporaryError:
        return True
    return True


@pytest.mark.parametrize("kind", CANDIDATE_KINDS)
def test_the_fake_takes_the_kinds_kube_takes(kind):
    """No server needed: the real Kube refuses an unknown kind before sending anything."""
    config = kubernetes.client.Configuration()
    config.host = f"https://127.0.0.1:{free_port()}"
    config.retries = 0
    real, fake = Kube(kubernetes.client.ApiClient(config)), FakeKube(namespaces=("ns",))
    manifest = {"kind": kind, "metadata": {"name": "x", "namespace": "ns"}}
    for method, call in {
        "read": lambda k: k.read(kind, "x", "ns"),
        "apply": lambda k: k.apply(manifest),
        "create": lambda k: k.create(manifest),
        "delete": lambda k: k.delete(kind, "x", "ns"),
    }.items():
        assert _taken(lambda: call(fake)) == _taken(lambda: call(real)), (
            f"Kube.{method} {'takes' if _taken(lambda: call(real)) else 'refuses'} {kind}, the "
            f"fake does not: update FakeKube.{method.upper()}_KINDS")
