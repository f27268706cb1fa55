"""The operator's layering, written down and checked (STYLE.md: three layers).

Builders, placement and status are pure; only ``kube`` talks to the Kubernetes API; only
``collect`` talks HTTP to workers. That the operator imports no other component is an import
contract (``tests/test_import_contracts.py``), which also sees imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
PURE = {"labels", "credentials", "workers", "volumes", "cleanup_job", "placement", "status", "config",
        "ownership", "gate", "consumers", "conditions", "refresh"}
IO_LIBS = {"kubernetes", "kopf", "aiohttp", "urllib3", "requests", "asyncio"}


def imports(module: str) -> set[str]:
    tree = ast.parse((OPERATOR / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0] if not node.module.startswith("datahoard.")
                      else ".".join(node.module.split(".")[:2]))
    return found


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_layers_do_no_io(module: str) -> None:
    assert not imports(module) & IO_LIBS


def test_only_kube_imports_the_kubernetes_client() -> None:
    users = {p.stem for p in OPERATOR.glob("*.py") if "kubernetes" in imports(p.stem)}
    assert users == {"kube"}

