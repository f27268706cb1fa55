"""CI smoke test of the benchmark harness: ``python -m bench.run --quick`` end to end.

It builds what it needs first (MinIO from its Go module, cached in TOOLS_DIR; the latency
proxy), runs every system and workload on a small data set, and checks that the results
document and RESULTS.md are complete. No performance threshold is asserted: CI machines vary,
and the full run (``make bench``) is where the targets are judged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS_DIR = Path(os.environ.get("TOOLS_DIR", Path.home() / ".cache/datahoard-tools"))
TARGETS = ("warm_vs_local_direct", "small_warm_vs_local", "shards_warm_vs_local", "random_warm_vs_local",
           "small_dropped_vs_local", "shards_dropped_vs_local", "cold_vs_best_peer", "cold_vs_boto3",
           "warming_vs_store", "warm_vs_direct_s3", "rss_bytes_per_file", "mount_1m_seconds")
#: Comparisons issue 17 asks for, with no target: their value must be measured all the same.
COMPARISONS = ("direct_vs_passthrough_small_warm", "direct_vs_passthrough_small_dropped",
               "kernel_opens_vs_passthrough_small_warm", "kernel_opens_vs_passthrough_small_dropped",
               "small_warm_passthrough_vs_local", "small_dropped_kernel_opens_vs_local")

pytestmark = [pytest.mark.integration, pytest.mark.tools]   # MinIO, built from Go


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, dropping the page cache)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package iproute2)"
    if not (TOOLS_DIR / "minio" / "minio").exists() and shutil.which("go") is None:
        return "needs Go to build MinIO (not built yet in TOOLS_DIR)"
    return None


@pytest.mark.timeout(1500)
def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    # First build on a fresh machine is most of this test's time; later runs reuse it.
    subprocess.run([str(REPO / "bench" / "build-tools.sh"), str(TOOLS_DIR)], check=True, timeout=1200)
    namespaces_before = _namespaces()
    out = tmp_path / "out"
    env = {**os.environ, "TOOLS_DIR": str(TOOLS_DIR)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(TARGETS) <= set(results["targets"])
    for name in TARGETS + COMPARISONS:
        assert results["targets"][name]["value"] is not None, (name, results["targets"][name])
    systems = {(r["workload"], r["system"], r["epoch"]) for r in results["runs"]}
    for workload in ("imagenet", "shards", "random"):
        for system in ("local disk", "datahoard"):
            assert {(workload, system, "cold"), (workload, system, "warm")} <= systems
        assert (workload, "datahoard", "dropped") in systems
    # Passthrough, not kernel opens, serves the cached datasets (issue 17); without it, kernel opens.
    assert {v["how"] for k, v in results["serving_after"].items() if k != "imagenet_no_passthrough"} == {"passthrough"}
    assert results["serving_after"]["imagenet_no_passthrough"]["how"] == "kernel opens"
    for row in results["runs"]:
        assert not row["errors"], row
        assert row["ops"] > 0, row
    # A warm try repeats its operations until it lasts about a second (one pass of the random
    # reads lasts milliseconds), and every repeat is read.
    warm = {(r["workload"], r["system"]): r for r in results["runs"] if r["epoch"] == "warm"}
    assert warm[("random", "local disk")]["passes"] > 1, warm[("random", "local disk")]
    assert warm[("random", "datahoard")]["passes"] > 1, warm[("random", "datahoard")]
    for key in (("random", "local disk"), ("random", "datahoard"), ("shards", "datahoard")):
        assert warm[key]["complete"] and warm[key]["ops"] == warm[key]["planned_ops"], warm[key]
    assert results["warming"]["state"] == "done"
    assert not (tmp_path / "work").exists(), "the harness must clean up its scratch space"
    text = (out / "RESULTS.md").read_text()
    assert "## Targets" in text and "## Metadata scale" in text
    assert _namespaces() <= namespaces_before, "the harness must delete its network namespace"


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith("dhb-")}
