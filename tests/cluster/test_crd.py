"""The CRD installed in a real API server: the examples apply, `kubectl get` prints our
columns, and the server accepts and refuses exactly what the pydantic model does."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes
import pytest
import yaml

from datahoard import api, names
from tests.support.envtest import REPO, ControlPlane

pytestmark = pytest.mark.cluster

CASES = yaml.safe_load((Path(__file__).with_name("spec_cases.yaml")).read_text())
COLUMNS = ["NAME", "SOURCE", "PHASE", "FILES", "TOTAL", "CACHED", "HIT RATIO", "NODES", "RATE", "ETA",
           "AGE"]
#: `-o wide` adds these after them.
WIDE = [*COLUMNS, "WARMED", "LIFETIME HIT RATIO", "STALE"]


def _create(api_client: kubernetes.client.ApiClient, namespace: str, name: str, spec: dict) -> dict:
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    # Strict is what `kubectl apply` does by default: unknown fields are errors, not pruned.
    return kubernetes.client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, body, field_validation="Strict")


def test_examples_apply_and_print_the_columns(control_plane: ControlPlane, crd: Path,
                                              namespace: str) -> None:
    for example in ("s3-secret.yaml", "dataset.yaml"):
        control_plane.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / example))
    out = control_plane.kubectl("get", "datasets", "-n", namespace).stdout
    header = out.splitlines()[0]
    positions = [header.find(col) for col in COLUMNS]
    assert -1 not in positions, header
    assert positions == sorted(positions), header
    assert "s3://" in out.splitlines()[1]
    wide = control_plane.kubectl("get", "datasets", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    positions = [wide.find(col) for col in WIDE]
    assert -1 not in positions and positions == sorted(positions), wide
    # The short name works too.
    assert control_plane.kubectl("get", "dset", "-n", namespace).stdout.splitlines()[0] == header
    control_plane.kubectl("delete", "-n", namespace, "-f", str(REPO / "examples" / "dataset.yaml"))


@pytest.mark.parametrize("spec", CASES["valid"].values(), ids=list(CASES["valid"]))
def test_server_accepts_and_defaults_like_the_model(api_client: kubernetes.client.ApiClient,
                                                    crd: Path, namespace: str, spec: dict) -> None:
    stored = _create(api_client, namespace, "ok", spec)["spec"]
    # No operator runs in this module, so nothing holds a finalizer: deletion is immediate and
    # keeps these Datasets away from the operator tests that run later in the session.
    kubernetes.client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, "ok")
    model = api.parse_spec(spec).model_dump(by_alias=True, exclude_none=True)
    assert stored == model


@pytest.mark.parametrize("case", CASES["invalid"].values(), ids=list(CASES["invalid"]))
def test_server_refuses_with_the_same_message(api_client: kubernetes.client.ApiClient,
                                              crd: Path, namespace: str, case: dict) -> None:
    with pytest.raises(kubernetes.client.ApiException) as info:
        _create(api_client, namespace, "bad", case["spec"])
    assert info.value.status in (400, 422), info.value.body
    message = json.loads(info.value.body)["message"]
    assert case["error"] in message


def _apply(control_plane: ControlPlane, namespace: str, spec: dict) -> str:
    manifest = yaml.safe_dump({"apiVersion": names.API_VERSION, "kind": names.KIND,
                               "metadata": {"name": "typos"}, "spec": spec})
    result = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert result.returncode != 0
    return result.stderr


def test_kubectl_apply_explains_every_problem(control_plane: ControlPlane, crd: Path,
                                              namespace: str) -> None:
    # All rule violations are reported at once, each with its field and what is expected.
    err = _apply(control_plane, namespace, {"source": {"uri": "gs://bucket/x"},
                                            "cache": {"capacity": "lots"}})
    for fragment in ("spec.source.uri", "must be s3://<bucket>", "spec.cache.capacity",
                     "must be a size such as 500Mi"):
        assert fragment in err, err
    # Type and enum errors are reported first (the API server checks rules after them).
    err = _apply(control_plane, namespace, {"source": {"uri": "s3://bucket/x"},
                                            "warm": {"policy": "Lazy"}})
    assert "spec.warm.policy" in err and '"Eager", "OnDemand"' in err, err
