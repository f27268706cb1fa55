"""The chart against a real kube-apiserver (RBAC on): every rendered manifest is accepted, and
the operator, running as the chart's ServiceAccount with exactly the chart's RBAC and the
Deployment's own command and environment, reconciles a Dataset from creation to cleanup. The
audit log then shows that it was never refused and which granted permissions it used."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from datahoard import names
from tests.support.chart import (CHART, CUSTOM_VALUES, NAMESPACE, RELEASE, REPO, AuditedControlPlane,
                                 Rendered, run_helm)
from tests.support.kubelet import Kubelet, make_node
from tests.support.polling import eventually
from tests.support.ports import free_port

# The first test of a session may build helm (~5 min on 2 cores with a cold Go cache).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

SA_USER = f"system:serviceaccount:{NAMESPACE}:datahoard-operator"

#: Permissions operator/rbac.yaml grants that one create-reconcile-delete pass (measured from the
#: audit log) does not use, and why they are still granted. A grant missing from this table and
#: unused fails the test, so a new unneeded permission cannot slip in unnoticed.
RARELY_USED = {
    # Server-side apply creates DaemonSets and Secret copies with PATCH; the API server then
    # checks `create` inside the request (no separate audit event), so it is needed.
    ("apps", "daemonsets", "create"): "apply-create",
    ("", "secrets", "create"): "apply-create",
    ("", "configmaps", "create"): "apply-create (the snapshot ConfigMap)",
    ("networking.k8s.io", "networkpolicies", "create"): "apply-create (the per-Dataset peer policy)",
    # Single reads not seen in one pass; kept for error and idempotency paths (409 on create,
    # re-reads after a conflict). Candidates for review by the operator's owners.
    ("", "persistentvolumeclaims", "get"): "error path",
    ("apps", "daemonsets", "get"): "error path",
    ("batch", "jobs", "get"): "error path",
    ("", "pods", "get"): "error path",
    ("", "nodes", "get"): "error path",
    ("datahoard.io", "datasets", "get"): "error path",
    ("datahoard.io", "datasets/status", "get"): "error path",
    # Kept although one pass does not use them (list/watch/update grants nobody used were
    # removed from operator/rbac.yaml in issue 13):
    ("", "namespaces", "get"): "kopf needs namespaces only for -n globs; the chart runs -A",
    ("", "namespaces", "list"): "kopf needs namespaces only for -n globs; the chart runs -A",
    ("", "namespaces", "watch"): "kopf needs namespaces only for -n globs; the chart runs -A",
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"): "kopf lists/watches only",
    ("", "events", "patch"): "kopf creates Events",
    ("", "pods", "watch"): "pods are listed per reconcile",
    ("", "pods", "delete"): "restarts a worker that listed another snapshot onto the Dataset's "
                            "(tests/cluster/test_snapshot_cluster.py)",
    ("", "pods", "patch"): "removes the datahoard.io/warm scheduling gate, from gated pods only "
                           "(tests/cluster/test_gate.py)",
}


def kubectl_apply(plane: AuditedControlPlane, text: str, *args: str) -> subprocess.CompletedProcess:
    result = plane.kubectl("apply", *args, "-f", "-", input=text, check=False)
    assert result.returncode == 0, f"kubectl apply {' '.join(args)} refused:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def plane(audited_plane: AuditedControlPlane) -> AuditedControlPlane:
    audited_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    return audited_plane


@pytest.fixture(scope="module")
def api(plane: AuditedControlPlane) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))


@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["default", "custom"])
def test_every_rendered_manifest_is_accepted(plane: AuditedControlPlane, render,
                                             values: dict | None) -> None:
    rendered: Rendered = render(values)
    out = kubectl_apply(plane, rendered.text, "--dry-run=server").stdout
    # One line per object, each "(server dry run)": nothing was skipped.
    assert out.count("(server dry run)") == len(rendered.docs), out


@pytest.fixture(scope="module")
def installed(plane: AuditedControlPlane, helm: str, render) -> Rendered:
    """`helm install` for real, as the README says (nothing runs its pods: no kubelet here)."""
    out = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                   kubeconfig=plane.kubeconfig).stdout
    notes = out.split("NOTES:", 1)[1]
    # NOTES tell a user what to apply next.
    for hint in ("examples/dataset.yaml", "kubectl -n <namespace> get datasets", "/dev/fuse",
                 "claimName", "kubectl delete crd datasets.datahoard.io"):
        assert hint in notes, notes
    plane.kubectl("wait", "--for=condition=Established", "crd/datasets.datahoard.io", "--timeout=60s")
    eventually(lambda: plane.kubectl("get", "datasets", "-A", check=False).returncode == 0,
               timeout=30, what="kubectl to discover datasets")
    rendered = render()
    for doc in rendered.docs:  # what helm created is what `helm template` renders
        ns = ["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []
        plane.kubectl("get", doc["kind"], doc["metadata"]["name"], *ns)
    return rendered


def test_examples_are_accepted(plane: AuditedControlPlane, installed: Rendered) -> None:
    """examples/*.yaml as a user applies them; the PyTorchJob's pod templates as pods would be
    (its CRD comes with the Kubeflow training operator, which is not installed here)."""
    ns = f"ex-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    for example in ("s3-secret.yaml", "dataset.yaml", "job.yaml"):
        kubectl_apply(plane, (REPO / "examples" / example).read_text(), "-n", ns, "--dry-run=server")
    for example in ("pytorchjob.yaml", "pytorchjob-warm-gate.yaml"):
        job = yaml.safe_load((REPO / "examples" / example).read_text())
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
        replicas = job["spec"]["pytorchReplicaSpecs"]
        # The training operator's webhook rules.
        assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
        for role, spec in replicas.items():
            containers = spec["template"]["spec"]["containers"]
            assert any(c["name"] == "pytorch" for c in containers), role
            template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
                        "template": spec["template"]}
            kubectl_apply(plane, yaml.safe_dump(template), "-n", ns, "--dry-run=server")
            claims = [v["persistentVolumeClaim"]["claimName"]
                      for v in spec["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert claims == ["imagenet"], role


def test_e2e_manifests_are_accepted(plane: AuditedControlPlane, installed: Rendered) -> None:
    """What e2e/run.sh applies besides the chart and the examples: the in-cluster S3 and seed."""
    plane.kubectl("create", "namespace", "minio", check=False)
    for name in ("s3.yaml", "seed.yaml"):
        text = (REPO / "e2e" / name).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d and d["kind"] != "Namespace"]
        out = kubectl_apply(plane, yaml.safe_dump_all(docs), "--dry-run=server").stdout
        assert out.count("(server dry run)") == len(docs), out


class Operator:
    """The operator started the way its Deployment starts it: the image's entrypoint with the
    Deployment's args and env, authenticated as the chart's ServiceAccount."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log: Path,
                 overrides: dict[str, str]) -> None:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.health_port = free_port()
        self.args = [a.replace(":8080/", f":{self.health_port}/") for a in container["args"]]
        env = {e["name"]: e["value"] for e in container["env"]}
        env.update(overrides)
        self.env = {**os.environ, **env, "KUBECONFIG": str(kubeconfig),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "datahoard.entrypoint", *self.args],
                                     env=self.env, cwd=REPO, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def healthz(self) -> bool:
        assert self.proc and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def operator(plane: AuditedControlPlane, installed: Rendered, tmp_path: Path) -> Iterator[Operator]:
    sa = installed.find("ServiceAccount", "datahoard-operator")["metadata"]["name"]
    token = plane.kubectl("create", "token", sa, "-n", NAMESPACE, "--duration", "1h").stdout.strip()
    config = yaml.safe_load(plane.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    op = Operator(installed.find("Deployment"), kubeconfig, tmp_path / "operator.log", {
        # Fast loops so the test takes seconds; everything else is the Deployment's.
        "DATAHOARD_INTERVAL": "1", "DATAHOARD_DELETE_POLL": "1", "DATAHOARD_STATS_TIMEOUT": "2",
        "DATAHOARD_STATS_PORT": str(free_port()), "DATAHOARD_METRICS_PORT": str(free_port()),
        "PYTHONWARNINGS": "ignore:Unverified HTTPS request"})
    op.start()
    yield op
    op.stop()
    print("---- operator log (tail) ----\n" + "\n".join(op.log.read_text().splitlines()[-60:]))


def granted(rendered: Rendered) -> set[tuple[str, str, str]]:
    out = set()
    for kind in ("ClusterRole", "Role"):
        for rule in rendered.find(kind)["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((group, resource, verb))
    return out


def used(plane: AuditedControlPlane) -> tuple[set[tuple[str, str, str]], list[str]]:
    calls, refused = set(), []
    for event in plane.requests_by(SA_USER):
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        key = (ref.get("apiGroup", ""), resource, event["verb"])
        if event.get("responseStatus", {}).get("code") == 403:
            refused.append(f"{key} {event['requestURI']}")
        elif ref:
            calls.add(key)
    return calls, refused


def test_operator_with_the_charts_rbac_reconciles_a_dataset(
        plane: AuditedControlPlane, api: kubernetes.client.ApiClient, installed: Rendered,
        operator: Operator) -> None:
    core = kubernetes.client.CoreV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    gpu, cpu = f"gpu-{uuid.uuid4().hex[:6]}", f"cpu-{uuid.uuid4().hex[:6]}"
    make_node(api, gpu, gpus=4)
    make_node(api, cpu)
    ns = f"ml-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    eventually(operator.healthz, timeout=60, what="the operator's liveness endpoint")

    # 1. The user's part, exactly as the examples say.
    for example in ("s3-secret.yaml", "dataset.yaml"):
        plane.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / example))

    # 2. Workers on the GPU node only, with the chart's worker defaults; credentials copied.
    worker = names.worker_name(ns, "imagenet")

    def daemonset() -> dict | None:
        try:
            return api.sanitize_for_serialization(apps.read_namespaced_daemon_set(worker, NAMESPACE))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    ds = eventually(daemonset, what="the worker DaemonSet")
    pod_spec = ds["spec"]["template"]["spec"]
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [t["matchFields"][0]["values"] for t in terms["nodeSelectorTerms"]] == [[gpu]]
    assert pod_spec["serviceAccountName"] == "datahoard-worker"
    (container,) = pod_spec["containers"]
    assert container["image"] == "ghcr.io/datahoard/datahoard:0.1.0"
    assert container["resources"]["limits"]["memory"] == "4Gi"
    assert container["command"][:2] == ["datahoard", "mount"]
    assert core.read_namespaced_secret(worker, NAMESPACE).data.keys() == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    # 3. Play the DaemonSet controller and kubelet: the worker is Ready; volume and label follow.
    kubelet = Kubelet(api)
    pod = kubelet.start_pod(ds, gpu)
    kubelet.set_status(NAMESPACE, pod, ready=True)
    label = names.node_label(ns, "imagenet")
    eventually(lambda: core.read_node(gpu).metadata.labels.get(label) == "true", what="node label")
    pvc = eventually(lambda: core.list_namespaced_persistent_volume_claim(ns).items, what="the PVC")
    assert pvc[0].metadata.name == "imagenet"
    pv = core.read_persistent_volume(names.pv_name(ns, "imagenet"))
    assert pv.spec.csi.driver == installed.find("CSIDriver")["metadata"]["name"]

    def status() -> dict:
        return custom.get_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.PLURAL,
                                                   "imagenet").get("status") or {}

    # The worker here is a stand-in with no stats endpoint: its node is listed, ready, but not
    # counted in readyNodes, which counts only nodes whose stats are current (issue 15).
    eventually(lambda: [(n["name"], n["ready"]) for n in status().get("nodes", [])] == [(gpu, True)]
               and status().get("readyNodes") == "0/1", what="status with the ready node")

    # 4. Delete: everything goes, the cleanup Job runs on the node that held the cache.
    plane.kubectl("delete", "dataset", "imagenet", "-n", ns, "--wait=false")
    eventually(lambda: daemonset() is None, what="workers removed")
    core.delete_namespaced_pod(pod, NAMESPACE, grace_period_seconds=0)

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.PLURAL, "imagenet")
            return False
        except kubernetes.client.ApiException as exc:
            return exc.status == 404

    eventually(gone, what="the Dataset to be deleted")
    assert label not in (core.read_node(gpu).metadata.labels or {})
    assert core.list_namespaced_persistent_volume_claim(ns).items == []
    jobs = kubernetes.client.BatchV1Api(api).list_namespaced_job(NAMESPACE).items
    assert [j.spec.template.spec.node_name for j in jobs] == [gpu]
    assert operator.proc.poll() is None

    # 5. The audit log: never refused, and every grant either used or listed with its reason.
    time.sleep(1)  # the audit backend writes asynchronously
    calls, refused = used(plane)
    assert not refused, "the chart's RBAC refused the operator:\n" + "\n".join(refused)
    grants = granted(installed)
    assert calls <= grants, f"calls outside the grants: {sorted(calls - grants)}"
    unused = grants - calls
    assert unused <= RARELY_USED.keys(), (
        f"granted but never used, and not listed in RARELY_USED: {sorted(unused - RARELY_USED.keys())}")
    # Timing decides some of these (a retry, a re-list after a watch ends), so this is a note.
    print(f"RARELY_USED entries used in this run: {sorted(RARELY_USED.keys() & calls)}")


def operator_client(plane: AuditedControlPlane, installed: Rendered, tmp_path: Path) -> kubernetes.client.CoreV1Api:
    """A client that authenticates as the chart's operator ServiceAccount (a real token), so
    the API server applies that account's RBAC and admission policies."""
    sa = installed.find("ServiceAccount", "datahoard-operator")["metadata"]["name"]
    token = plane.kubectl("create", "token", sa, "-n", NAMESPACE, "--duration", "1h").stdout.strip()
    config = yaml.safe_load(plane.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    return kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(kubeconfig)))


def test_admission_policy_holds_the_operator_to_its_own_labels_and_volumes(
        plane: AuditedControlPlane, api: kubernetes.client.ApiClient, installed: Rendered,
        tmp_path: Path) -> None:
    """RBAC grants `patch nodes` and `create persistentvolumes` whole; the chart's
    ValidatingAdmissionPolicy lets the operator's ServiceAccount change only its
    dataset.datahoard.io/* node labels and create only csi.datahoard.io PVs."""
    as_operator = operator_client(plane, installed, tmp_path)
    node = f"vap-{uuid.uuid4().hex[:6]}"
    make_node(api, node, gpus=1)

    def refused(call) -> str:
        try:
            call()
        except kubernetes.client.ApiException as exc:
            assert exc.status in (403, 422), exc
            return exc.body
        raise AssertionError("the admission policy let it through")

    try:
        # The policy is enforced once its binding is loaded; the first refusal says so.
        message = eventually(lambda: refused(lambda: as_operator.patch_node(
            node, {"spec": {"taints": [{"key": "evil", "effect": "NoSchedule"}]}})),
            timeout=60, what="the admission policy to refuse a taint")
        assert "only dataset.datahoard.io/* labels" in message
        body = refused(lambda: as_operator.patch_node(node, {"metadata": {"labels": {"role": "x"}}}))
        assert "only dataset.datahoard.io/* labels" in body
        # What the operator really does is allowed.
        as_operator.patch_node(node, {"metadata": {"labels": {"dataset.datahoard.io/ml.d": "true"}}})
        as_operator.patch_node(node, {"metadata": {"labels": {"dataset.datahoard.io/ml.d": None}}})
        body = refused(lambda: as_operator.create_persistent_volume({
            "metadata": {"name": f"host-{node}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "hostPath": {"path": "/"}}}))
        assert "only csi.datahoard.io PersistentVolumes" in body
        # Nor may it delete someone else's volume.
        admin = kubernetes.client.CoreV1Api(api)
        admin.create_persistent_volume({
            "metadata": {"name": f"theirs-{node}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "hostPath": {"path": "/srv/theirs"}}})
        body = refused(lambda: as_operator.delete_persistent_volume(f"theirs-{node}"))
        assert "only csi.datahoard.io PersistentVolumes" in body
        admin.delete_persistent_volume(f"theirs-{node}")
    finally:
        kubernetes.client.CoreV1Api(api).delete_node(node)


def test_admission_policy_lets_the_operator_only_remove_its_own_gate(
        plane: AuditedControlPlane, api: kubernetes.client.ApiClient, installed: Rendered,
        tmp_path: Path) -> None:
    """RBAC grants `patch pods` whole (a pod's image, labels, tolerations); the policy lets the
    operator's ServiceAccount remove the datahoard.io/warm scheduling gate and nothing else."""
    as_operator = operator_client(plane, installed, tmp_path)
    ns = f"gate-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    kubernetes.client.CoreV1Api(api).create_namespaced_pod(ns, {
        "metadata": {"name": "trainer", "labels": {"app": "train"}},
        "spec": {"schedulingGates": [{"name": "example.com/quota"}, {"name": "datahoard.io/warm"}],
                 "containers": [{"name": "pytorch", "image": "pytorch"}]}})

    def refused(patch: dict) -> str:
        try:
            as_operator.patch_namespaced_pod(
                "trainer", ns, patch, _content_type="application/strategic-merge-patch+json")
        except kubernetes.client.ApiException as exc:
            assert exc.status in (403, 422), exc
            return exc.body
        raise AssertionError(f"the admission policy let {patch} through")

    only = "may only remove the datahoard.io/warm scheduling gate"
    # Kubernetes lets an update add tolerations (not change them): keep the defaults, add one.
    tolerations = api.sanitize_for_serialization(
        kubernetes.client.CoreV1Api(api).read_namespaced_pod("trainer", ns).spec.tolerations or [])
    assert only in eventually(lambda: refused({"metadata": {"labels": {"app": "evil"}}}),
                              timeout=60, what="the admission policy to refuse a pod label")
    for patch in ({"spec": {"containers": [{"name": "pytorch", "image": "evil"}]}},
                  {"metadata": {"annotations": {"x": "y"}}},
                  {"spec": {"tolerations": [*tolerations, {"operator": "Exists"}]}},
                  {"spec": {"nodeSelector": {"kubernetes.io/hostname": "elsewhere"}}},
                  {"spec": {"schedulingGates": [{"name": "example.com/quota", "$patch": "delete"}]}}):
        assert only in refused(patch), patch
    # What the operator really sends (operator/gate.py) is allowed, and keeps the other gate.
    from datahoard.operator import gate
    uid = kubernetes.client.CoreV1Api(api).read_namespaced_pod("trainer", ns).metadata.uid
    as_operator.patch_namespaced_pod("trainer", ns, gate.ungate_patch(uid),
                                     _content_type="application/strategic-merge-patch+json")
    pod = kubernetes.client.CoreV1Api(api).read_namespaced_pod("trainer", ns)
    assert [g.name for g in pod.spec.scheduling_gates] == ["example.com/quota"]
    assert pod.metadata.labels == {"app": "train"}


def test_uninstall_keeps_the_crd_and_the_datasets(plane: AuditedControlPlane, helm: str,
                                                  installed: Rendered) -> None:
    ns = f"keep-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    kubectl_apply(plane, (REPO / "examples" / "dataset.yaml").read_text(), "-n", ns)
    run_helm(helm, "uninstall", RELEASE, "--namespace", NAMESPACE, kubeconfig=plane.kubeconfig)
    plane.kubectl("get", "crd", "datasets.datahoard.io")
    assert "imagenet" in plane.kubectl("get", "datasets", "-n", ns).stdout
    for doc in installed.docs:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        ns_args = ["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []
        result = plane.kubectl("get", doc["kind"], doc["metadata"]["name"], *ns_args, check=False)
        assert result.returncode != 0 and "NotFound" in result.stderr, (doc["kind"], result.stdout)
