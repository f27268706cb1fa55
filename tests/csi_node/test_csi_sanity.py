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

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CSI_TEST_VERSION = "v5.6.0"
SKIP = "Controller|should remove target path|should fail when volume does not exist on the specified path"


def csi_sanity_binary() -> Path:
    """$CSI_SANITY, else the cached build, else build it now with `go install` (about 90 s)."""
    if env := os.environ.get("CSI_SANITY"):
        return Path(env)
    tools = Path(os.environ.get("DATAHOARD_TOOLS_DIR", Path.home() / ".cache" / "datahoard-tools"))
    out = tools / f"csi-sanity-{CSI_TEST_VERSION}"
    binary = out / "csi-sanity"
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        pytest.skip("csi-sanity needs a Go toolchain to build it (or CSI_SANITY=/path/to/csi-sanity)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # concurrent test runs build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            subprocess.run(
                ["go", "install", f"github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@{CSI_TEST_VERSION}"],
                env={**os.environ, "GOBIN": str(out)}, check=True, capture_output=True, timeout=280,
            )
    return binary


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
