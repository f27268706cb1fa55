"""csi-sanity (kubernetes-csi/csi-test), the CSI conformance suite, against the plugin.

Besides checking the codes again, this proves wire compatibility: csi-sanity is a Go client
built from the official spec, so a wrong field number or enum in our csi.proto shows up here.
csi-sanity is built once from its Go module (the module proxy is reachable where GitHub
release downloads are not) and cached next to the other test tools.

Skipped specs: everything of the Controller service (this driver has none), and the two Node
specs that first create a volume through the controller's CreateVolume; their behaviour (target
removed after unpublish, NOT_FOUND for a published volume at a wrong path) is covered in
test_csi_rpc.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.tools]   # csi-sanity, built from Go

REPO = Path(__file__).resolve().parents[2]
SKIP = "Controller|should remove target path|should fail when volume does not exist on the specified path"


def csi_sanity_binary() -> Path:
    """$CSI_SANITY, else tests/tools/build-csi-sanity.sh's build (cached; about 90 s cold)."""
    if env := os.environ.get("CSI_SANITY"):
        return Path(env)
    if shutil.which("go") is None:
        pytest.skip("csi-sanity needs a Go toolchain to build it (or CSI_SANITY=/path/to/csi-sanity)")
    tools = os.environ.get("TOOLS_DIR", str(Path.home() / ".cache" / "datahoard-tools"))
    out = subprocess.run([str(REPO / "tests/tools/build-csi-sanity.sh"), tools], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=280).stdout
    return Path(out.strip().splitlines()[-1])


def test_csi_sanity_node_and_identity(plugin, tmp_path: Path):
    result = subprocess.run(
        [str(csi_sanity_binary()), "-csi.endpoint", f"unix://{plugin.socket}",
         "-csi.mountdir", str(tmp_path / "mount"), "-csi.stagingdir", str(tmp_path / "staging"),
         "-ginkgo.skip", SKIP, "-ginkgo.fail-on-empty", "-ginkgo.no-color"],
        capture_output=True, text=True, timeout=240,
    )
    summary = [line for line in result.stdout.splitlines() if "Passed" in line]
    assert result.returncode == 0, result.stdout[-4000:]
    assert summary and " 0 Failed" in summary[-1], summary
