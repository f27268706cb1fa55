"""The chart without a cluster: lint, render with default and non-default values, and the
contracts it shares with the rest of the repository (CRD text, RBAC rules, operator settings)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from datahoard import names
from datahoard.operator.config import OperatorSettings
from tests.support.chart import CHART, CUSTOM_VALUES, NAMESPACE, REPO, run_helm, values_file

# The first test of a session may build helm (~5 min on 2 cores with a cold Go cache).
pytestmark = pytest.mark.timeout(1800)

CRD = REPO / "crds" / "datasets.datahoard.io.yaml"


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# -- lint and schema -------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["default", "custom"])
def test_lint_is_clean(helm: str, tmp_path: Path, values: dict | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values_file(tmp_path, values))]
    out = run_helm(helm, *args).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("bad, message", [
    ({"operator": {"replicas": 2}}, "replicas"),                       # unknown key
    ({"csiNode": {"kubeletDir": "var/lib/kubelet"}}, "kubeletDir"),    # relative path
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"worker": {"statsPort": 70000}}, "statsPort"),
    ({"operator": {"sourceSchemes": ["ftp"]}}, "sourceSchemes"),
])
def test_schema_rejects_bad_values(helm: str, tmp_path: Path, bad: dict, message: str) -> None:
    result = run_helm(helm, "template", "x", str(CHART), "--values", str(values_file(tmp_path, bad)),
                      check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml has a comment line right above it (or an inline one)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z][\w-]*:", line) or "#" in line:
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#"):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert not missing, "values.yaml keys without a comment:\n" + "\n".join(missing)


def test_schema_covers_every_value() -> None:
    """values.schema.json forbids unknown keys, so every key in values.yaml must be in it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, sch: dict, path: str) -> None:
        props = sch.get("properties")
        if props is None:
            return
        for key, value in node.items():
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict):
                walk(value, props[key], f"{path}{key}.")

    walk(values, schema, "")


# -- the CRD ---------------------------------------------------------------------------------

def test_chart_ships_the_crd_byte_for_byte(render) -> None:
    shipped = CHART / "files" / "datasets.datahoard.io.yaml"
    assert shipped.read_bytes() == CRD.read_bytes(), (
        f"{shipped} differs from {CRD}: copy crds/ into the chart (cp {CRD.relative_to(REPO)} "
        f"{shipped.relative_to(REPO)})")
    rendered = render()
    crd = rendered.find("CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "datahoard"
    # Apart from the inserted labels and annotation, the object is the source of truth's.
    source = yaml.safe_load(CRD.read_text())
    del crd["metadata"]["labels"], crd["metadata"]["annotations"]
    assert crd == source
    # And the text is the file's text, line for line, outside the inserted metadata block.
    crd_text = next(doc for doc in rendered.text.split("\n---\n")
                    if "kind: CustomResourceDefinition" in doc)
    body = re.sub(r"\n  labels:\n(    .*\n)+  annotations:\n    helm.sh/resource-policy: keep\n",
                  "\n", crd_text)
    assert CRD.read_text().strip() in body


def test_crds_can_be_left_out(render) -> None:
    assert "CustomResourceDefinition" not in render(CUSTOM_VALUES).kinds()


# -- operator --------------------------------------------------------------------------------

def test_operator_deployment(render) -> None:
    dep = render().find("Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "datahoard-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]


@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["default", "custom"])
def test_operator_env_is_exactly_its_settings(render, values, monkeypatch) -> None:
    """Every DATAHOARD_* variable the chart sets is an operator setting, and parses."""
    container = render(values).find("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in env_of(container).items() if k.startswith("DATAHOARD_")}
    known = {f"DATAHOARD_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) <= known, f"the operator does not read {sorted(set(env) - known)}"
    for key in known:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    assert settings.namespace == NAMESPACE
    v = values or yaml.safe_load((CHART / "values.yaml").read_text())
    image = v["image"]
    assert settings.worker_image == f"{image['repository']}:{image.get('tag') or '0.1.0'}"
    assert str(settings.host_root) == v["worker"]["hostRoot"]
    assert settings.stats_port == v["worker"]["statsPort"]
    assert settings.worker_memory_limit == v["worker"]["resources"]["limits"]["memory"]
    assert settings.source_schemes == v["operator"]["sourceSchemes"]
    assert settings.interval == v["operator"]["interval"]


def test_chart_defaults_are_the_operators_defaults(render, monkeypatch) -> None:
    """With default values the chart sets each operator setting to the operator's own default
    (only the install-specific ones differ), so the two cannot drift apart silently."""
    container = render().find("Deployment")["spec"]["template"]["spec"]["containers"][0]
    for key in {f"DATAHOARD_{n.upper()}" for n in OperatorSettings.model_fields}:
        monkeypatch.delenv(key, raising=False)
    defaults = OperatorSettings()
    for key, value in env_of(container).items():
        if key.startswith("DATAHOARD_"):
            monkeypatch.setenv(key, value)
    from_chart = OperatorSettings()
    # peer_network_policy follows networkPolicy.enabled: the operator alone must not isolate
    # workers with a policy when no chart policy admits the operator to them.
    install_specific = {"worker_image", "worker_service_account", "peer_network_policy"}
    differ = {name: (getattr(defaults, name), getattr(from_chart, name))
              for name in OperatorSettings.model_fields
              if name not in install_specific and getattr(defaults, name) != getattr(from_chart, name)}
    assert not differ, f"chart default != operator default (operator, chart): {differ}"


def test_rbac_is_the_operators_own(render) -> None:
    """The chart grants exactly the rules of operator/rbac.yaml, bound to its ServiceAccount."""
    want = {d["kind"]: d["rules"] for d in yaml.safe_load_all((REPO / "operator" / "rbac.yaml").read_text())}
    rendered = render()
    assert rendered.find("ClusterRole")["rules"] == want["ClusterRole"]
    role = rendered.find("Role")
    assert role["rules"] == want["Role"] and role["metadata"]["namespace"] == NAMESPACE
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        assert rendered.find(kind)["subjects"] == [
            {"kind": "ServiceAccount", "name": "datahoard-operator", "namespace": NAMESPACE}]
    custom = render(CUSTOM_VALUES)
    assert custom.find("ClusterRoleBinding")["subjects"][0]["name"] == "hoarder"
    assert custom.find("ServiceAccount", "hoarder")["metadata"]["annotations"] == {"team": "ml"}


# -- CSI -------------------------------------------------------------------------------------

def test_csi_driver_object(render) -> None:
    driver = render().find("CSIDriver")
    assert driver["metadata"]["name"] == names.CSI_DRIVER_NAME
    assert driver["spec"] == {"attachRequired": False, "podInfoOnMount": True,
                              "fsGroupPolicy": "None", "volumeLifecycleModes": ["Persistent"]}
    assert "CSIDriver" not in render(CUSTOM_VALUES).kinds()


def _containers(ds: dict) -> dict[str, dict]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def _host_paths(ds: dict) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}


def test_csi_node_daemonset_defaults(render) -> None:
    ds = render().find("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    c = _containers(ds)
    assert set(c) == {"csi-node", "node-driver-registrar", "liveness-probe"}
    plugin = c["csi-node"]
    assert plugin["securityContext"] == {"privileged": True}
    assert plugin["args"][0] == "csi-node" and "--host-root=/var/lib/datahoard" in plugin["args"]
    assert env_of(plugin)["CSI_ENDPOINT"] == "unix:///csi/csi.sock"
    node_name = next(e for e in plugin["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert mounts["pods-dir"] == {"name": "pods-dir", "mountPath": "/var/lib/kubelet/pods",
                                  "mountPropagation": "Bidirectional"}
    assert mounts["host-root"]["mountPropagation"] == "HostToContainer"
    assert not any(a.startswith("--no-fuse-keeper") for a in plugin["args"])  # the keeper is on
    assert plugin["livenessProbe"]["httpGet"]["port"] == "healthz"
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.datahoard.io/csi.sock" in \
        c["node-driver-registrar"]["args"]
    assert "--health-port=9898" in c["liveness-probe"]["args"]
    assert _host_paths(ds) == {
        "plugin-dir": "/var/lib/kubelet/plugins/csi.datahoard.io/",
        "registration-dir": "/var/lib/kubelet/plugins_registry/",
        "pods-dir": "/var/lib/kubelet/pods",
        "host-root": "/var/lib/datahoard",
    }


def test_csi_node_daemonset_follows_kubelet_dir_and_host_root(render) -> None:
    ds = render(CUSTOM_VALUES).find("DaemonSet")
    kubelet = "/var/snap/microk8s/common/var/lib/kubelet"
    assert _host_paths(ds) == {
        "plugin-dir": f"{kubelet}/plugins/csi.datahoard.io/",
        "registration-dir": f"{kubelet}/plugins_registry/",
        "pods-dir": f"{kubelet}/pods",
        "host-root": "/mnt/nvme/datahoard",
    }
    c = _containers(ds)
    assert f"--kubelet-registration-path={kubelet}/plugins/csi.datahoard.io/csi.sock" in \
        c["node-driver-registrar"]["args"]
    assert {"name": "pods-dir", "mountPath": f"{kubelet}/pods",
            "mountPropagation": "Bidirectional"} in c["csi-node"]["volumeMounts"]
    assert "--no-namespace-repair" in c["csi-node"]["args"]
    assert "--no-fuse-keeper" in c["csi-node"]["args"]
    assert "hostPID" not in ds["spec"]["template"]["spec"]
    assert c["csi-node"]["image"] == "registry.example.com/ml/datahoard:0.1.0-rc1"


def test_worker_and_image_settings(render) -> None:
    default = render()
    assert default.find("ServiceAccount", "datahoard-worker")["automountServiceAccountToken"] is False
    dep_env = env_of(default.find("Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert dep_env["DATAHOARD_WORKER_SERVICE_ACCOUNT"] == "datahoard-worker"
    custom = render(CUSTOM_VALUES)
    names_ = {d["metadata"]["name"] for d in custom.docs if d["kind"] == "ServiceAccount"}
    assert names_ == {"hoarder", "dh-csi-node"}
    env = env_of(custom.find("Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert env["DATAHOARD_WORKER_SERVICE_ACCOUNT"] == ""
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    digest = "sha256:" + "a" * 64
    pinned = render({"image": {"digest": digest}})
    assert pinned.find("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"ghcr.io/datahoard/datahoard@{digest}"
    for doc in custom.docs:
        assert doc["metadata"]["labels"]["team"] == "ml-platform", doc["kind"]


def test_operator_metrics_port_is_exposed_and_can_be_turned_off(render) -> None:
    def container(values: dict | None = None) -> dict:
        return render(values).find("Deployment")["spec"]["template"]["spec"]["containers"][0]

    default = container()
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in default["ports"]
    assert env_of(default)["DATAHOARD_METRICS_PORT"] == "9102"
    off = container({"operator": {"metricsPort": 0}})
    assert [p["name"] for p in off["ports"]] == ["health"]
    assert env_of(off)["DATAHOARD_METRICS_PORT"] == "0"


def test_the_plugin_and_the_workers_see_one_keeper_socket(render) -> None:
    """The plugin serves the FUSE keeper on <host root>/run/keeper/keeper.sock
    (runtime.keeper_socket under the run dir the plugin sets); a worker finds it there through
    its own DATAHOARD_RUN_DIR. Both pods must mount that directory from the same host path, at
    the same path."""
    from pathlib import Path

    from datahoard import names
    from datahoard.api import Dataset
    from datahoard.operator import workers
    from datahoard.operator.config import OperatorSettings

    ds = render().find("DaemonSet")
    plugin = _containers(ds)["csi-node"]
    host_root = next(m["mountPath"] for m in plugin["volumeMounts"] if m["name"] == "host-root")
    assert _host_paths(ds)["host-root"] == host_root  # the plugin sees host paths at their own path
    settings = OperatorSettings(namespace="datahoard-system", host_root=Path(host_root))
    dataset = Dataset.from_body({"metadata": {"namespace": "ml", "name": "x", "uid": "u", "generation": 1},
                                 "spec": {"source": {"uri": "s3://bucket/p/"}, "cache": {"capacity": "1Gi"}}})
    pod = workers.worker_daemonset(dataset, ["n"], settings, None)["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    run_dir = str(names.run_dir(Path(host_root)))
    [run_mount] = [m for m in worker["volumeMounts"] if m["mountPath"] == run_dir]
    [run_volume] = [v for v in pod["volumes"] if v["name"] == run_mount["name"]]
    assert run_volume["hostPath"]["path"] == run_dir
    assert {"name": "DATAHOARD_RUN_DIR", "value": run_dir} in worker["env"]
    assert run_dir.startswith(host_root + "/")
