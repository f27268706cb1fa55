"""Fixtures for the chart tests: a helm binary (built once from its Go module by `make helm`),
`helm template` rendering, and the audited control plane (see tests/support/chart.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import (CHART, NAMESPACE, RELEASE, REPO, AuditedControlPlane, Rendered, run_helm,
                                 values_file)
from tests.support.envtest import assets_dir


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary: $HELM, or built once into TOOLS_DIR by `make helm`."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "helm"], cwd=REPO, check=True,
                         stdout=subprocess.PIPE, text=True, timeout=1500).stdout
    path = out.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"`make helm` printed {path!r}, not an executable"
    return path


@pytest.fixture(scope="session")
def render(helm: str, tmp_path_factory: pytest.TempPathFactory):
    """render(values=None, *extra helm args) -> Rendered: `helm template` of the chart."""
    def _render(values: dict[str, Any] | None = None, *extra: str) -> Rendered:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
        if values is not None:
            args += ["--values", str(values_file(tmp_path_factory.mktemp("values"), values))]
        text = run_helm(helm, *args).stdout
        docs = [d for d in yaml.safe_load_all(text) if d]
        return Rendered(text, docs)
    return _render


@pytest.fixture(scope="session")
def audited_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedControlPlane]:
    plane = AuditedControlPlane(assets=assets_dir(), workdir=tmp_path_factory.mktemp("chart-envtest"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here that needs helm (built from Go by `make helm`) is in the ``chart`` tier,
    so `make unit` (``not chart``) needs no Go; the pure checks of chart files stay unit."""
    for item in items:
        if "helm" in getattr(item, "fixturenames", ()) and _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.chart)


def pytest_configure(config: pytest.Config) -> None:
    # The test API server's certificate is self-signed; the kubeconfig says to skip verification.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")
