"""The import contracts of pyproject.toml ``[tool.importlinter]``, checked by import-linter.

import-linter builds its graph with grimp, which reads every ``import`` statement, those inside
functions included: an AST test of top-level imports once missed ``cache_worker`` importing the
CSI plugin's mounter from inside two functions.

Why not the ``lint-imports`` command: ``datahoard`` and ``datahoard.operator`` are namespace
packages, and setuptools maps ``datahoard.operator`` from ``operator/`` (pyproject.toml
package-dir). grimp finds its modules under their right names but names the package itself by
the path it was found at (``.<checkout>.operator``), so import-linter stops with "Module
'datahoard.operator' does not exist". :class:`MappedGraphBuilder` is import-linter's own
builder plus that one correction; everything else (reading the contracts, checking them,
the report) is import-linter's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.adapters.building import GraphBuilder
from importlinter.application import use_cases
from importlinter.application.app_config import settings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
COMPONENTS = ("datahoard.operator", "datahoard.cache_worker", "datahoard.csi_node")

_graphs: dict[tuple, grimp.ImportGraph] = {}


class MappedGraphBuilder(GraphBuilder):
    """grimp's graph with each root package under its own name; ``extra`` imports are added,
    to show that a violation is caught."""

    def __init__(self, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.extra = extra

    def build(self, root_package_names, cache_dir, include_external_packages=False,
              exclude_type_checking_imports=False) -> grimp.ImportGraph:
        key = (tuple(root_package_names), include_external_packages, exclude_type_checking_imports)
        if key not in _graphs:  # about a second; the violation tests reuse it
            graph = super().build(root_package_names, cache_dir=None, include_external_packages=include_external_packages,
                                  exclude_type_checking_imports=exclude_type_checking_imports)
            tops = {root.split(".")[0] for root in root_package_names}
            for misnamed in [m for m in graph.modules if m.split(".")[0] not in tops]:
                assert not graph.find_modules_directly_imported_by(misnamed), misnamed  # a package with no code
                graph.remove_module(misnamed)
            for root in root_package_names:
                graph.add_module(root)
            _graphs[key] = graph
        graph = copy.deepcopy(_graphs[key])
        for importer, imported in self.extra:
            graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
        return graph


def check(extra: tuple[tuple[str, str], ...] = ()) -> dict[str, bool]:
    """Each contract's id and whether it is kept."""
    configuration.configure()
    settings.configure(GRAPH_BUILDER=MappedGraphBuilder(extra))
    # What lint_imports does first; without it, this test passed only after one that ran lint_imports.
    use_cases._register_built_in_contract_types()  # noqa: SLF001
    report = use_cases.create_report(use_cases.read_user_options(str(PYPROJECT)), cache_dir=None)
    assert not report.invalid_contract_options, report.invalid_contract_options
    return {contract.contract_options["id"]: result.kept for contract, result in report.get_contracts_and_checks()}


def test_the_import_contracts_are_kept(capsys):
    configuration.configure()
    settings.configure(GRAPH_BUILDER=MappedGraphBuilder())
    kept = use_cases.lint_imports(str(PYPROJECT), cache_dir=None, no_logo=True)
    assert kept, "an import contract is broken (pyproject.toml [tool.importlinter]):\n" + capsys.readouterr().out


def test_the_graph_holds_every_module_and_imports_inside_functions():
    graph = MappedGraphBuilder().build(["datahoard", *COMPONENTS], cache_dir=None)
    for package in COMPONENTS:
        assert graph.find_children(package), f"{package} has no modules in the graph"
    # datahoard.cli imports the CSI plugin's server inside main(): grimp must see it.
    assert graph.direct_import_exists(importer="datahoard.cli", imported="datahoard.csi_node.server")


@pytest.mark.parametrize("importer, imported", [
    # The data plane importing the CSI plugin (what cache_worker/tree.py once did, in a function).
    ("datahoard.cache_worker.tree", "datahoard.csi_node.mounter"),
    ("datahoard.csi_node.views", "datahoard.cache_worker.tree"),
    ("datahoard.operator.workers", "datahoard.cache_worker.worker"),
    ("datahoard.cache_worker.worker", "datahoard.operator.kube"),
    # The model importing a component or the composition root.
    ("datahoard.mounts", "datahoard.csi_node.mounter"),
    ("datahoard.names", "datahoard.operator.config"),
    ("datahoard.units", "datahoard.cli"),
])
def test_a_violating_import_breaks_the_contract(importer, imported):
    assert check(extra=((importer, imported),)) == {"layers": False}


def test_a_new_module_must_be_given_a_layer():
    """``exhaustive``: a module added to datahoard/ is checked only once it has a layer."""
    assert check(extra=(("datahoard.newcomer", "datahoard.names"),)) == {"layers": False}
