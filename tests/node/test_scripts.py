"""The node tier's scripts lint clean (no root or cluster needed, so this runs everywhere)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.nodekube import REPO

#: Every script that builds a tool or runs the node cluster (the kind e2e's are linted by tests/e2e).
SCRIPTS = [REPO / "tests/node/cluster.sh", REPO / "tests/node/second-node.sh", REPO / "tests/node/node-configs.sh",
           *sorted((REPO / "tests/tools").glob("*.sh")), REPO / "tests/csi_node/kubeletwatcher/build.sh",
           REPO / "bench/build-tools.sh"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_node_scripts_pass_shellcheck() -> None:
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
