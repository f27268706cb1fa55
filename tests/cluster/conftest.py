"""Fixtures for the cluster tier: one control plane per session, the CRD installed once, a fresh
namespace per test. Everything here is marked ``cluster`` by the tests that use it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from tests.support.cluster import Cluster
from tests.support.envtest import REPO, ControlPlane, assets_dir
from tests.support.kubelet import Kubelet, OperatorProcess, make_node
from tests.support.polling import eventually
from tests.support.ports import free_port

CRD_PATH = REPO / "crds" / "datasets.datahoard.io.yaml"


def pytest_configure(config: pytest.Config) -> None:
    # The test API server's certificate is self-signed; the kubeconfig says to skip verification.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")
    config.addinivalue_line("markers", "operator_env(**env): extra DATAHOARD_* settings for the "
                            "operator a cluster test starts")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(assets=assets_dir(), workdir=tmp_path_factory.mktemp("envtest"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane, api_client: kubernetes.client.ApiClient) -> Path:
    """The Dataset CRD, applied with kubectl exactly as a user would, and Established."""
    control_plane.kubectl("apply", "-f", str(CRD_PATH))
    ext = kubernetes.client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        crd = ext.read_custom_resource_definition("datasets.datahoard.io")
        return any(c.type == "Established" and c.status == "True"
                   for c in crd.status.conditions or [])

    eventually(established, timeout=30, what="the CRD to be Established")
    # Discovery caches in kubectl lag behind; wait until `kubectl get datasets` works.
    eventually(lambda: control_plane.kubectl("get", "datasets", "-A", check=False).returncode == 0,
               timeout=30, what="kubectl to discover datasets")
    return CRD_PATH


@pytest.fixture
def namespace(control_plane: ControlPlane, api_client: kubernetes.client.ApiClient) -> str:
    """A fresh namespace (namespaces never finish deleting without a controller-manager)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubernetes.client.CoreV1Api(api_client).create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="session")
def system_namespace(api_client: kubernetes.client.ApiClient) -> str:
    """The operator's namespace; the chart creates it in a real installation."""
    from datahoard import names

    try:
        kubernetes.client.CoreV1Api(api_client).create_namespace(
            {"metadata": {"name": names.SYSTEM_NAMESPACE}})
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
    return names.SYSTEM_NAMESPACE


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane, system_namespace: str,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig for the operator's ServiceAccount, bound to operator/rbac.yaml only.

    The operator tests run under it, so a permission missing from the rules fails a test
    here instead of a deployment.
    """
    sa = "datahoard-operator"
    kubectl = control_plane.kubectl
    kubectl("apply", "-f", str(REPO / "operator" / "rbac.yaml"))
    kubectl("create", "serviceaccount", sa, "-n", system_namespace)
    kubectl("create", "clusterrolebinding", sa, "--clusterrole", sa,
            "--serviceaccount", f"{system_namespace}:{sa}")
    kubectl("create", "rolebinding", sa, "-n", system_namespace, "--role", sa,
            "--serviceaccount", f"{system_namespace}:{sa}")
    token = kubectl("create", "token", sa, "-n", system_namespace, "--duration", "24h").stdout.strip()
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def node_names(api_client: kubernetes.client.ApiClient) -> Iterator[dict[str, str]]:
    """Fake nodes: two with GPUs, one without; removed afterwards so tests do not share them."""
    suffix = uuid.uuid4().hex[:6]
    nodes = {"gpu-a": f"gpu-a-{suffix}", "gpu-b": f"gpu-b-{suffix}", "cpu": f"cpu-{suffix}"}
    make_node(api_client, nodes["gpu-a"], gpus=8)
    make_node(api_client, nodes["gpu-b"], gpus=4)
    make_node(api_client, nodes["cpu"], labels={"cache": "yes"})
    yield nodes
    core = kubernetes.client.CoreV1Api(api_client)
    for name in nodes.values():
        core.delete_node(name)


@pytest.fixture
def kubelet(api_client: kubernetes.client.ApiClient) -> Iterator[Kubelet]:
    k = Kubelet(api_client)
    yield k
    k.stop_all()


@pytest.fixture
def operator_env(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Operator configuration for a test; ``@pytest.mark.operator_env(NAME=value)`` adds to it."""
    marker = request.node.get_closest_marker("operator_env")
    return {**{
        "DATAHOARD_NAMESPACE": "datahoard-system",
        "DATAHOARD_WORKER_IMAGE": "example.com/datahoard:test",
        # Fast loops so tests take seconds; the code paths are the production ones.
        "DATAHOARD_INTERVAL": "1",
        "DATAHOARD_DELETE_POLL": "1",
        "DATAHOARD_STATS_TIMEOUT": "5",
        "DATAHOARD_STATS_PORT": str(free_port()),
        "DATAHOARD_METRICS_PORT": str(free_port()),
        "DATAHOARD_HOST_ROOT": str(tmp_path / "host"),
        # The test API server's certificate is self-signed (the kubeconfig skips verification).
        "PYTHONWARNINGS": "ignore:Unverified HTTPS request",
    }, **(marker.kwargs if marker else {})}


@pytest.fixture
def operator(crd: Path, operator_kubeconfig: Path, operator_env: dict[str, str],
             tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator, running for real as `kopf run` under its RBAC rules; its log is printed
    when a test fails."""
    op = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log", operator_env)
    op.start()
    yield op
    op.stop()
    tail = [line[:400] for line in op.output().splitlines()[-60:]]
    print("---- operator log (tail) ----\n" + "\n".join(tail))


@pytest.fixture
def cluster(api_client: kubernetes.client.ApiClient, control_plane: ControlPlane) -> Cluster:
    return Cluster(api_client, control_plane)
