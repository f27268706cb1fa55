"""Tenants never touch each other's objects, data or credentials (issue 13, item 2 and the
operator's "Also broken" items), with the operator running for real against a real API server.

The pair ``team-x/data`` and ``team/x-data`` is the one that shared every object when names were
``dh-<ns>-<name>``: here each gets its own DaemonSet, Secret copy and PV, deleting one leaves the
other's intact, and objects that are not a Dataset's own are refused with a condition."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from datahoard import names
from tests.support.cluster import Cluster
from tests.support.kubelet import Kubelet, OperatorProcess, make_node
from tests.support.polling import eventually

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE


def ensure_namespace(cluster: Cluster, name: str) -> None:
    try:
        cluster.core.create_namespace({"metadata": {"name": name}})
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise


def command_uri(ds: dict[str, Any]) -> str:
    return ds["spec"]["template"]["spec"]["containers"][0]["command"][2]


def secret_value(cluster: Cluster, name: str, key: str = "AWS_ACCESS_KEY_ID") -> str:
    return base64.b64decode(cluster.core.read_namespaced_secret(name, SYSTEM).data[key]).decode()


def read_pv(cluster: Cluster, name: str) -> Any | None:
    try:
        return cluster.core.read_persistent_volume(name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_datasets_whose_old_names_collided_get_their_own_objects(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
        node_names: dict[str, str]) -> None:
    pair = [("team-x", "data", "bucket-a", "key-of-team-x"),
            ("team", "x-data", "bucket-b", "key-of-team")]
    gpu = node_names["gpu-a"]
    secrets = {}
    for ns, name, bucket, key in pair:
        ensure_namespace(cluster, ns)
        secrets[ns] = f"creds-{uuid.uuid4().hex[:6]}"
        cluster.core.create_namespaced_secret(ns, {"metadata": {"name": secrets[ns]},
                                                   "stringData": {"AWS_ACCESS_KEY_ID": key,
                                                                  "AWS_SECRET_ACCESS_KEY": "s"}})
    # The old names really were the same: this is the pair the issue reported.
    assert names.legacy_worker_name("team-x", "data") == names.legacy_worker_name("team", "x-data")
    for ns, name, bucket, _ in pair:
        cluster.apply_dataset(ns, name, {"source": {"uri": f"s3://{bucket}/", "secretRef":
                                                    {"name": secrets[ns]}},
                                         "warm": {"policy": "OnDemand"}})

    # 1. Each has its own DaemonSet (its own bucket) and its own Secret copy (its own key).
    workers = {}
    for ns, name, bucket, key in pair:
        ds = eventually(lambda ns=ns, name=name: cluster.daemonset(ns, name),
                        what=f"{ns}/{name}'s workers")
        assert command_uri(ds) == f"s3://{bucket}/"
        eventually(lambda ns=ns, name=name: cluster.owned(ns, name)["Secret"]
                   == [names.worker_name(ns, name)], what=f"{ns}/{name}'s Secret copy")
        assert secret_value(cluster, names.worker_name(ns, name)) == key
        workers[ns] = kubelet.start_pod(ds, gpu)
        kubelet.set_status(SYSTEM, workers[ns], ready=True)
    assert names.worker_name(*pair[0][:2]) != names.worker_name(*pair[1][:2])

    # 2. ... and its own PV, pre-bound to its own PVC.
    for ns, name, *_ in pair:
        eventually(lambda ns=ns, name=name: cluster.owned(ns, name)["PersistentVolumeClaim"] == [name],
                   what=f"{ns}/{name}'s volume")
        pv = cluster.core.read_persistent_volume(names.pv_name(ns, name))
        assert (pv.spec.claim_ref.namespace, pv.spec.claim_ref.name) == (ns, name)
        assert pv.metadata.annotations["datahoard.io/dataset-uid"] == \
            cluster.dataset(ns, name)["metadata"]["uid"]
        eventually(lambda ns=ns, name=name: cluster.condition(ns, name, "ObjectsOwned").get("status")
                   == "True", what=f"{ns}/{name}'s ObjectsOwned condition")
    first = {kind: cluster.owned("team-x", "data")[kind] for kind in ("DaemonSet", "Secret",
                                                                      "PersistentVolume")}
    ds_before = cluster.daemonset("team-x", "data")

    # 3. Deleting team/x-data removes its objects only; team-x/data's are exactly as they were.
    cluster.plane.kubectl("delete", "dataset", "x-data", "-n", "team", "--wait=false")
    eventually(lambda: cluster.daemonset("team", "x-data") is None, what="team/x-data's workers removed")
    cluster.core.delete_namespaced_pod(workers["team"], SYSTEM, grace_period_seconds=0)
    eventually(lambda: cluster.dataset("team", "x-data") is None, timeout=120, what="team/x-data to go")
    assert read_pv(cluster, names.pv_name("team", "x-data")) is None
    after = {kind: cluster.owned("team-x", "data")[kind] for kind in first}
    assert after == first
    ds_after = cluster.daemonset("team-x", "data")
    assert ds_after["metadata"]["uid"] == ds_before["metadata"]["uid"]
    assert command_uri(ds_after) == "s3://bucket-a/"
    assert secret_value(cluster, names.worker_name("team-x", "data")) == "key-of-team-x"
    assert read_pv(cluster, names.pv_name("team-x", "data")) is not None
    assert cluster.core.read_namespaced_persistent_volume_claim("data", "team-x").status.phase != "Lost"

    cluster.plane.kubectl("delete", "dataset", "data", "-n", "team-x", "--wait=false")
    eventually(lambda: cluster.daemonset("team-x", "data") is None, what="team-x/data's workers removed")
    cluster.core.delete_namespaced_pod(workers["team-x"], SYSTEM, grace_period_seconds=0)
    eventually(lambda: cluster.dataset("team-x", "data") is None, timeout=120, what="team-x/data to go")


def test_objects_that_are_not_the_datasets_own_are_refused_and_kept(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
        node_names: dict[str, str], namespace: str) -> None:
    gpu = node_names["gpu-a"]
    # Someone else's DaemonSet, already at the name the Dataset "squat" would use.
    squatter = names.worker_name(namespace, "squat")
    cluster.apps.create_namespaced_daemon_set(SYSTEM, {
        "metadata": {"name": squatter, "labels": {"app": "theirs"}},
        "spec": {"selector": {"matchLabels": {"app": "theirs"}},
                 "template": {"metadata": {"labels": {"app": "theirs"}},
                              "spec": {"containers": [{"name": "c", "image": "theirs:1"}]}}}})
    # And someone else's PV at the name the Dataset "land" would use.
    land_pv = names.pv_name(namespace, "land")
    cluster.core.create_persistent_volume({
        "metadata": {"name": land_pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                 "hostPath": {"path": "/srv/theirs"}, "storageClassName": "theirs"}})
    cluster.apply_dataset(namespace, "squat", {"source": {"uri": "s3://bucket/squat/"}})
    cluster.apply_dataset(namespace, "land", {"source": {"uri": "s3://bucket/land/"},
                                              "warm": {"policy": "OnDemand"}})

    owned = eventually(lambda: cluster.condition(namespace, "squat", "ObjectsOwned"),
                       what="squat's ObjectsOwned condition")
    assert owned["status"] == "False" and owned["reason"] == "NameConflict"
    assert f"DaemonSet {SYSTEM}/{squatter} belongs to no Dataset" in owned["message"]
    eventually(lambda: any(t == "Warning" and r == "NameConflict" and squatter in m
                           for t, r, m in cluster.events(namespace, "squat")),
               what="a NameConflict Event")
    theirs = cluster.apps.read_namespaced_daemon_set(squatter, SYSTEM)
    assert theirs.spec.template.spec.containers[0].image == "theirs:1"
    assert not (theirs.metadata.annotations or {}).get("datahoard.io/dataset-uid")

    ds = eventually(lambda: cluster.daemonset(namespace, "land"), what="land's workers")
    pod = kubelet.start_pod(ds, gpu)
    kubelet.set_status(SYSTEM, pod, ready=True)
    volume = eventually(lambda: cluster.condition(namespace, "land", "VolumeReady").get("reason")
                        == "NameConflict" and cluster.condition(namespace, "land", "VolumeReady"),
                        what="land's VolumeReady to name the conflict")
    assert volume["status"] == "False"
    owned = cluster.condition(namespace, "land", "ObjectsOwned")
    assert owned["reason"] == "NameConflict" and f"PersistentVolume {land_pv}" in owned["message"]
    assert cluster.owned(namespace, "land")["PersistentVolumeClaim"] == []  # not bound to theirs
    assert cluster.core.read_persistent_volume(land_pv).spec.host_path.path == "/srv/theirs"

    # Deleting the Datasets deletes nothing of theirs.
    for name in ("squat", "land"):
        cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--wait=false")
    eventually(lambda: cluster.daemonset(namespace, "land") is None, what="land's workers removed")
    cluster.core.delete_namespaced_pod(pod, SYSTEM, grace_period_seconds=0)
    for name in ("squat", "land"):
        eventually(lambda n=name: cluster.dataset(namespace, n) is None, timeout=120, what=f"{name} to go")
    assert cluster.apps.read_namespaced_daemon_set(squatter, SYSTEM).spec.template.spec.containers[0].image \
        == "theirs:1"
    assert read_pv(cluster, land_pv) is not None
    cluster.apps.delete_namespaced_daemon_set(squatter, SYSTEM)
    cluster.core.delete_persistent_volume(land_pv)


def test_upgrade_retires_only_the_old_operators_objects_of_this_dataset(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet,
        node_names: dict[str, str], namespace: str) -> None:
    """What a 0.1.x operator left: a DaemonSet and Secret copy at the old name, annotated with
    the Dataset's <namespace>/<name> and no uid. The new operator removes those (its own workers
    take over under the new name), but not an old object that names another Dataset."""
    old = names.legacy_worker_name(namespace, "old")
    other_old = names.legacy_worker_name(namespace, "kept")

    def legacy_daemonset(name: str, owner: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "annotations": {"datahoard.io/dataset": owner},
                             "labels": {"datahoard.io/dataset": name}},
                "spec": {"selector": {"matchLabels": {"datahoard.io/dataset": name}},
                         "template": {"metadata": {"labels": {"datahoard.io/dataset": name}},
                                      "spec": {"containers": [{"name": "worker", "image": "old:0.1"}]}}}}

    cluster.apps.create_namespaced_daemon_set(SYSTEM, legacy_daemonset(old, f"{namespace}/old"))
    cluster.core.create_namespaced_secret(SYSTEM, {"metadata": {
        "name": old, "annotations": {"datahoard.io/dataset": f"{namespace}/old"}},
        "stringData": {"AWS_ACCESS_KEY_ID": "stale"}})
    # At "kept"'s old name, but annotated for another Dataset: not "kept"'s to remove.
    cluster.apps.create_namespaced_daemon_set(SYSTEM, legacy_daemonset(other_old, "elsewhere/x"))
    for name in ("old", "kept"):
        cluster.apply_dataset(namespace, name, {"source": {"uri": f"s3://bucket/{name}/"}})
        eventually(lambda n=name: cluster.daemonset(namespace, n), what=f"{name}'s new workers")

    def gone(kind: str, name: str) -> bool:
        read = (cluster.apps.read_namespaced_daemon_set if kind == "DaemonSet"
                else cluster.core.read_namespaced_secret)
        try:
            read(name, SYSTEM)
            return False
        except kubernetes.client.ApiException as exc:
            return exc.status == 404

    eventually(lambda: gone("DaemonSet", old) and gone("Secret", old), what="the old objects retired")
    assert not gone("DaemonSet", other_old)

    # The old operator's volume: a PVC (ownerReference to the Dataset) bound to the old-named
    # PV. A PVC's volumeName cannot change, so the new operator keeps serving that PV.
    uid = cluster.dataset(namespace, "old")["metadata"]["uid"]
    old_pv = names.legacy_pv_name(namespace, "old")
    cluster.core.create_persistent_volume({
        "metadata": {"name": old_pv, "annotations": {"datahoard.io/dataset": f"{namespace}/old"}},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadOnlyMany"],
                 "storageClassName": "", "claimRef": {"namespace": namespace, "name": "old"},
                 "csi": {"driver": names.CSI_DRIVER_NAME, "volumeHandle": f"{namespace}/old"}}})
    cluster.core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "old", "ownerReferences": [{"apiVersion": names.API_VERSION,
                                                         "kind": names.KIND, "name": "old",
                                                         "uid": uid}]},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": old_pv,
                 "resources": {"requests": {"storage": "10Gi"}}}})
    pod = kubelet.start_pod(cluster.daemonset(namespace, "old"), node_names["gpu-a"])
    kubelet.set_status(SYSTEM, pod, ready=True)
    volume = eventually(lambda: cluster.condition(namespace, "old", "VolumeReady").get("status")
                        == "True" and cluster.condition(namespace, "old", "VolumeReady"),
                        what="the old volume to be served")
    assert f"bound to PV {old_pv}" in volume["message"]
    assert read_pv(cluster, names.pv_name(namespace, "old")) is None  # no second PV
    assert cluster.condition(namespace, "old", "ObjectsOwned")["status"] == "True"

    for name in ("old", "kept"):
        cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--wait=false")
    eventually(lambda: cluster.daemonset(namespace, "old") is None, what="old's workers removed")
    cluster.core.delete_namespaced_pod(pod, SYSTEM, grace_period_seconds=0)
    for name in ("old", "kept"):
        eventually(lambda n=name: cluster.dataset(namespace, n) is None, timeout=120, what=f"{name} to go")
    assert read_pv(cluster, old_pv) is None  # deleted with its Dataset, as before
    assert not gone("DaemonSet", other_old)
    cluster.apps.delete_namespaced_daemon_set(other_old, SYSTEM)


def test_what_the_installation_forbids_becomes_a_condition(
        cluster: Cluster, operator: OperatorProcess, node_names: dict[str, str],
        namespace: str) -> None:
    control_plane = f"cp-{uuid.uuid4().hex[:6]}"
    make_node(cluster.api, control_plane, gpus=1,
              labels={"node-role.kubernetes.io/control-plane": ""},
              taints=[{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}])
    try:
        specs = {
            "metadata": {"source": {"uri": "s3://bucket/x", "endpoint": "http://169.254.169.254"}},
            "identity": {"source": {"uri": "s3://bucket/x", "credentials": "NodeIdentity"}},
            "cp": {"source": {"uri": "s3://bucket/x"},
                   "placement": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                                 "tolerations": [{"operator": "Exists"}]}},
            "huge": {"source": {"uri": "s3://bucket/x"}, "cache": {"capacity": "1000Pi"}},
        }
        for name, spec in specs.items():
            cluster.apply_dataset(namespace, name, spec)
        expected = {"metadata": ("SpecValid", "EndpointForbidden", "169.254.169.254 is a link-local"),
                    "identity": ("SpecValid", "NodeIdentityForbidden", "NodeIdentity is forbidden"),
                    "cp": ("NodesSelected", "PlacementForbidden",
                           f"{control_plane}: label node-role.kubernetes.io/control-plane"),
                    "huge": ("NodesSelected", "PlacementForbidden",
                             "allocatable ephemeral-storage 500.0Gi < spec.cache.capacity 1000Pi")}
        for name, (type_, reason, text) in expected.items():
            cond = eventually(lambda n=name, t=type_, r=reason: cluster.condition(namespace, n, t)
                              .get("reason") == r and cluster.condition(namespace, n, t),
                              what=f"{name}: {type_} {reason}")
            assert cond["status"] == "False" and text in cond["message"], cond
            eventually(lambda n=name, r=reason: any(t == "Warning" and rr == r for t, rr, _ in
                                                    cluster.events(namespace, n)),
                       what=f"a {reason} Event for {name}")
            assert cluster.daemonset(namespace, name) is None
        for name in specs:
            cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--timeout=60s")
    finally:
        cluster.core.delete_node(control_plane)


@pytest.mark.integration  # runs a real FUSE worker: skipped without root and /dev/fuse
def test_a_worker_without_a_secret_never_asks_the_metadata_service(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, node_names: dict[str, str],
        namespace: str, operator_env: dict[str, str], s3_server: Any, s3: Any, bucket: str,
        tmp_path: Path) -> None:
    """The whole path: the operator's DaemonSet for a Dataset without secretRef, its worker run
    for real with the env that DaemonSet gives it, on a "node" whose metadata service hands out
    the node's role to whoever asks. The worker reads the public bucket and never asks."""
    from tests.support.metadata import FakeMetadata  # the same fake the unit tier uses

    import threading
    from http.server import ThreadingHTTPServer

    FakeMetadata.requests = []
    imds = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    try:
        # A public object: anonymous (unsigned) reads are what it allows.
        s3.put_object(Bucket=bucket, Key="open/a.bin", Body=b"public bytes", ACL="public-read")
        cluster.apply_dataset(namespace, "open", {
            "source": {"uri": f"s3://{bucket}/open/", "endpoint": s3_server.endpoint,
                       "region": "us-east-1"},
            "cache": {"capacity": "1Gi"}, "warm": {"policy": "OnDemand"}})
        ds = eventually(lambda: cluster.daemonset(namespace, "open"), what="the worker DaemonSet")
        port = operator_env["DATAHOARD_STATS_PORT"]
        kubelet.start_pod(ds, node_names["gpu-a"])
        kubelet.run_container(ds, f"127.0.0.1:{port}", tmp_path / "worker.log", node_env={
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{imds.server_address[1]}/",
            "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
        mnt = names.mount_dir(namespace, "open", Path(operator_env["DATAHOARD_HOST_ROOT"]))
        assert (mnt / "a.bin").read_bytes() == b"public bytes"
        assert FakeMetadata.requests == [], FakeMetadata.requests
    finally:
        kubelet.stop_all()
        imds.shutdown()
        imds.server_close()
    cluster.plane.kubectl("delete", "dataset", "open", "-n", namespace, "--wait=false")
