"""Fixtures for the cluster tier: one control plane per session, the CRD installed once, a fresh
namespace per test. Everything here is marked ``cluster`` by the tests that use it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from envtest import REPO, ControlPlane, assets_dir, eventually

CRD_PATH = REPO / "crds" / "datasets.datahoard.io.yaml"



def pytest_configure(config: pytest.Config) -> None:
    # The test API server's certificate is self-signed; the kubeconfig says to skip verification.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


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
