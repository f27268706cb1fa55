"""The chart's two ways of registering the CSI node plugin with kubelet (csiNode.registration):
the node-driver-registrar sidecar (default) and the plugin's own registration socket. Both
renderings, and that the rendered plugin arguments mean to ``datahoard csi-node`` what the
DaemonSet's volumes say (socket paths inside the container vs on the host). Likewise for
/healthz: the livenessprobe sidecar (default) or the plugin itself (csiNode.livenessProbe.sidecar
false), so a cluster that can pull neither sidecar image runs the plugin alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from datahoard import names
from datahoard.csi_node.registration import socket_name
from datahoard.csi_node.server import parse_args, socket_path
from tests.support.chart import CHART, NAMESPACE, run_helm, values_file

# The first test of a session may build helm (~5 min on 2 cores with a cold Go cache).
pytestmark = pytest.mark.timeout(1800)

KUBELET = {"csiNode": {"registration": "kubelet"}}
#: Neither sidecar: what a cluster without registry.k8s.io images installs.
NO_SIDECARS = {"csiNode": {"registration": "kubelet", "livenessProbe": {"sidecar": False}}}
MICROK8S = "/var/snap/microk8s/common/var/lib/kubelet"


def _pod(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]


def _containers(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _pod(ds)["containers"]}


def _volumes(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["hostPath"] for v in _pod(ds)["volumes"]}


def _host_path_of(ds: dict[str, Any], container: dict[str, Any], mount_path: str) -> str:
    """The host directory a container sees at *mount_path* (one of its hostPath mounts)."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    return _volumes(ds)[mount["name"]]["path"].rstrip("/")


def _plugin_args(container: dict[str, Any]) -> Any:
    """The container's args as ``datahoard csi-node`` parses them, $(VAR)s expanded like kubelet."""
    env = {e["name"]: e.get("value", f"<{e['name']}>") for e in container["env"]}
    args = list(container["args"])
    assert args[0] == "csi-node"
    expanded = []
    for arg in args[1:]:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        expanded.append(arg)
    return parse_args(expanded)


def test_registrar_is_the_default(render) -> None:
    ds = render().find("DaemonSet")
    c = _containers(ds)
    assert set(c) == {"csi-node", "node-driver-registrar", "liveness-probe"}
    plugin = c["csi-node"]
    assert not [a for a in plugin["args"] if "registration" in a]
    assert "registration-dir" not in {m["name"] for m in plugin["volumeMounts"]}
    assert _plugin_args(plugin).registration_dir is None
    assert {"name": "registration-dir", "mountPath": "/registration"} in c["node-driver-registrar"]["volumeMounts"]
    # The same with the value spelled out.
    assert render({"csiNode": {"registration": "registrar"}}).text == render().text


def test_kubelet_registration_has_no_sidecar_and_registers_itself(render) -> None:
    ds = render(KUBELET).find("DaemonSet")
    c = _containers(ds)
    assert set(c) == {"csi-node", "liveness-probe"}
    plugin = c["csi-node"]
    assert "--registration-dir=/registration" in plugin["args"]
    assert f"--kubelet-registration-path=/var/lib/kubelet/plugins/{names.CSI_DRIVER_NAME}/csi.sock" in plugin["args"]
    assert {"name": "registration-dir", "mountPath": "/registration"} in plugin["volumeMounts"]
    assert _volumes(ds)["registration-dir"] == {"path": "/var/lib/kubelet/plugins_registry/", "type": "Directory"}
    # Nothing else about the plugin changes.
    default = _containers(render().find("DaemonSet"))["csi-node"]
    assert [a for a in plugin["args"] if "registration" not in a] == default["args"]
    assert [m for m in plugin["volumeMounts"] if m["name"] != "registration-dir"] == default["volumeMounts"]
    assert c["liveness-probe"] == _containers(render().find("DaemonSet"))["liveness-probe"]


@pytest.mark.parametrize("kubelet_dir", ["/var/lib/kubelet", MICROK8S + "/"])
def test_rendered_arguments_point_kubelet_at_the_plugins_socket(render, kubelet_dir: str) -> None:
    """What the plugin will tell kubelet (GetInfo.endpoint) is the host path of the socket it
    serves, and its registration socket lands in kubelet's plugins_registry on the host."""
    ds = render({"csiNode": {"registration": "kubelet", "kubeletDir": kubelet_dir}}).find("DaemonSet")
    plugin = _containers(ds)["csi-node"]
    args = _plugin_args(plugin)
    kubelet = kubelet_dir.rstrip("/")

    served = Path(socket_path(args.endpoint))                      # inside the container
    on_host = Path(_host_path_of(ds, plugin, str(served.parent))) / served.name
    assert args.kubelet_registration_path == str(on_host)
    assert on_host == Path(f"{kubelet}/plugins/{names.CSI_DRIVER_NAME}/csi.sock")

    reg_dir = Path(_host_path_of(ds, plugin, str(args.registration_dir)))
    assert reg_dir == Path(f"{kubelet}/plugins_registry")
    assert (args.registration_dir / socket_name(names.CSI_DRIVER_NAME)).name == f"{names.CSI_DRIVER_NAME}-reg.sock"


def test_the_livenessprobe_sidecar_is_the_default(render) -> None:
    c = _containers(render().find("DaemonSet"))
    assert "--health-port=9898" in c["liveness-probe"]["args"]
    assert _plugin_args(c["csi-node"]).health_port is None


def test_without_sidecars_the_plugin_serves_healthz_itself(render) -> None:
    ds = render(NO_SIDECARS).find("DaemonSet")
    c = _containers(ds)
    assert set(c) == {"csi-node"}
    plugin = c["csi-node"]
    args = _plugin_args(plugin)
    assert args.registration_dir == Path("/registration")
    # The container's livenessProbe asks the port the plugin now serves /healthz on.
    assert plugin["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    port = next(p for p in plugin["ports"] if p["name"] == "healthz")["containerPort"]
    assert args.health_port == port == 9898
    # Nothing else about the plugin changes.
    with_sidecar = _containers(render(KUBELET).find("DaemonSet"))["csi-node"]
    assert [a for a in plugin["args"] if not a.startswith("--health-port")] == with_sidecar["args"]
    assert {k: v for k, v in plugin.items() if k != "args"} == {k: v for k, v in with_sidecar.items() if k != "args"}


@pytest.mark.parametrize("values", [KUBELET, NO_SIDECARS], ids=["kubelet", "no-sidecars"])
def test_lint_is_clean(helm: str, tmp_path: Path, values: dict) -> None:
    out = run_helm(helm, "lint", str(CHART), "--strict", "--namespace", NAMESPACE,
                   "--values", str(values_file(tmp_path, values))).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("bad, message", [
    ({"csiNode": {"registration": "sidecar"}}, "registration"),
    ({"csiNode": {"livenessProbe": {"sidecar": "no"}}}, "sidecar"),
])
def test_schema_rejects_bad_values(helm: str, tmp_path: Path, bad: dict, message: str) -> None:
    result = run_helm(helm, "template", "x", str(CHART), "--values", str(values_file(tmp_path, bad)), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("values", [KUBELET, NO_SIDECARS], ids=["kubelet", "no-sidecars"])
def test_rendering_is_accepted_by_the_api_server(audited_plane, render, values: dict) -> None:
    audited_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    rendered = render(values)
    result = audited_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.text, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(rendered.docs), result.stdout
