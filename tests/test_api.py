"""The Dataset model against the shared spec table; the same table runs against the real API
server in tests/cluster/test_crd.py, so together they check that model and CRD agree."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
import yaml

from datahoard import api

ROOT = Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((ROOT / "tests/cluster/spec_cases.yaml").read_text())
CRD = yaml.safe_load((ROOT / "crds/datasets.datahoard.io.yaml").read_text())


@pytest.mark.parametrize("spec", CASES["valid"].values(), ids=list(CASES["valid"]))
def test_model_accepts_what_the_schema_accepts(spec: dict) -> None:
    api.parse_spec(spec)


@pytest.mark.parametrize("case", CASES["invalid"].values(), ids=list(CASES["invalid"]))
def test_model_refuses_what_the_schema_refuses(case: dict) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        api.parse_spec(case["spec"])
    assert case["error"] in api.error_summary(info.value)


def test_defaults_are_the_schema_defaults() -> None:
    """Parsing a bare spec gives what the API server would store after defaulting."""
    spec = api.parse_spec({"source": {"uri": "s3://bucket/x"}})
    props = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec.cache.medium == props["cache"]["properties"]["medium"]["default"]
    assert spec.cache.capacity == props["cache"]["properties"]["capacity"]["default"]
    assert spec.warm.policy == props["warm"]["properties"]["policy"]["default"]
    assert spec.warm.parallelism == props["warm"]["properties"]["parallelism"]["default"]
    assert spec.placement.max_nodes == props["placement"]["properties"]["maxNodes"]["default"]


def _cel_patterns(node: object) -> set[str]:
    """Every regex inside a CEL ``matches('^...$')`` call in the CRD."""
    found: set[str] = set()
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            for pattern in re.findall(r"matches\('\^(.*?)\$'\)", rule["rule"]):
                found.add(pattern.replace("\\\\", "\\"))
        for value in node.values():
            found |= _cel_patterns(value)
    elif isinstance(node, list):
        for value in node:
            found |= _cel_patterns(value)
    return found


def test_model_regexes_are_the_crd_regexes() -> None:
    model = {api.URI_RE, api.ENDPOINT_RE, api.REGION_RE, api.SECRET_NAME_RE, api.QUANTITY_RE, api.DURATION_RE}
    assert _cel_patterns(CRD) == model


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1Mi", 2**20), ("1.5Gi", 3 * 2**29), ("2T", 2 * 10**12), ("1048576", 2**20), ("0.5", 1)],
)
def test_quantity_bytes(text: str, expected: int) -> None:
    assert api.quantity_bytes(text) == expected


@pytest.mark.parametrize(("count", "text"), [(512, "512"), (2**20, "1.0Mi"), (146_900_000_000, "136.8Gi")])
def test_format_bytes(count: int, text: str) -> None:
    assert api.format_bytes(count) == text
