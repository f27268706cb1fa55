"""Test helpers live once, in tests/support, and are imported one way (issue 16).

Helpers used to be imported three ways (``from tests.conftest import``, bare names that resolve
only because pytest puts a test folder on ``sys.path``, and ``sys.path.insert``), so the same
poll loop and free-port helper were written again and again. This reads every module of the test
tree (ast, not imports: nothing runs) and names each way back in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: Defined once in tests/support; a second definition elsewhere is a copy that will drift.
SUPPORT_ONLY = {"free_port", "eventually", "wait_for", "wait_until", "_wait_for", "start_moto"}
#: Top-level names that resolve only through a folder pytest put on sys.path: the folders of
#: the test tree and the source folders at the root (``cache_worker.x`` is a second copy of
#: ``datahoard.cache_worker.x``, with its own module state and logger names).
SOURCE_DIRS = {"cache_worker", "csi_node"}


def _local_names(tests: Path) -> set[str]:
    names = {p.stem for p in tests.rglob("*.py")} | {p.name for p in tests.rglob("*") if p.is_dir()}
    # ``bench`` is the repository's own package (``python -m bench.run``), which tests/bench tests.
    return names - {"tests", "bench", "__init__", "__pycache__"}


def _bare(module: str, local: set[str]) -> bool:
    # ``operator.x`` is our source folder; plain ``operator`` is the standard library's.
    first = module.split(".")[0]
    return "." in module if first == "operator" else first in local | SOURCE_DIRS


def problems(source: str, where: str, local: set[str], in_support: bool = False) -> list[str]:
    """Every way ``source`` reaches a helper other than ``from tests.support... import``."""
    tree = ast.parse(source)
    found = [f"{where}:{node.lineno}: {node.name}() defined again; use tests.support's"
             for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name in SUPPORT_ONLY and not in_support]
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append(f"{line}: sys.path edited or read; import from tests.support instead")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[-1] == "conftest":
                found.append(f"{line}: imports from a conftest; its helpers belong in tests.support")
            elif node.level == 0 and _bare(module, local):
                found.append(f"{line}: bare import of {module!r}, which resolves only through "
                             f"pytest's sys.path; use tests.support or datahoard.*")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _bare(alias.name, local):
                    found.append(f"{line}: bare import of {alias.name!r}")
    return found


def test_every_helper_is_imported_from_tests_support() -> None:
    local = _local_names(TESTS)
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        where = str(path.relative_to(REPO))
        if path == Path(__file__).resolve():
            continue
        found += problems(path.read_text(), where, local,
                          in_support=path.is_relative_to(TESTS / "support"))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("import sys\nsys.path.insert(0, 'x')\n", "sys.path edited"),
    ("from tests.conftest import datahoard\n", "imports from a conftest"),
    ("from .conftest import BLOCK_SIZE\n", "imports from a conftest"),
    ("from envtest import eventually\n", "bare import of 'envtest'"),
    ("from test_operator import Cluster\n", "bare import of 'test_operator'"),
    ("from cache_worker.counters import Counters\n", "bare import of 'cache_worker.counters'"),
    ("import csi_helpers\n", "bare import of 'csi_helpers'"),
    ("from operator.kube import Kube\n", "bare import of 'operator.kube'"),
    ("def free_port():\n    pass\n", "free_port() defined again"),
    ("def _wait_for(check):\n    pass\n", "_wait_for() defined again"),
])
def test_each_way_back_is_named(source: str, expected: str) -> None:
    local = {"envtest", "test_operator", "csi_helpers", "conftest"}
    found = problems(source, "t.py", local)
    assert len(found) == 1 and expected in found[0], found


def test_the_one_way_passes() -> None:
    source = ("from tests.support.polling import eventually\nfrom tests.support.fakes.kube import FakeKube\n"
              "from datahoard.cache_worker.counters import Counters\nfrom .data import OWNER\n"
              "from operator import itemgetter\nimport json\n"
              "class Watcher:\n    def wait_for(self, path):\n        pass\n")
    assert problems(source, "t.py", _local_names(TESTS)) == []
