"""``make reliability``: the long-running reliability tests, with their figures kept in RESULTS.md.

Runs the load test (64 reader threads, warming and eviction) and the worker-restart-under-readers
test with longer durations than CI gives them, collects the figures each test records
(tests/support/results.py), writes them to ``bench/reliability.json`` and regenerates ``RESULTS.md``
from that and ``results.json``. The tests assert the guarantees either way; this only makes
them run longer and keeps what they measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import report

REPO = Path(__file__).resolve().parent.parent
TESTS = {
    "load": "tests/cache_worker/test_reliability.py::test_many_concurrent_readers_with_warming_and_eviction",
    "restart_under_reader": "tests/csi_node/test_restart_under_reader.py",
}


def measure(load_seconds: float, restart_cycles: int, graceful_cycles: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="datahoard-reliability-") as folder:
        env = {
            **os.environ,
            "DATAHOARD_RESULTS_DIR": folder,
            "DATAHOARD_LOAD_SECONDS": str(load_seconds),
            "DATAHOARD_RESTART_CYCLES": str(restart_cycles),
            "DATAHOARD_GRACEFUL_CYCLES": str(graceful_cycles),
        }
        # The suite's per-test timeout (pyproject) is sized for CI's short runs.
        timeout = int(load_seconds + 30 * (restart_cycles + graceful_cycles) + 600)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={timeout}",
                   *TESTS.values()]
        subprocess.run(command, cwd=REPO, env=env, check=True)
        found = {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
    missing = set(TESTS) - set(found)
    if missing:
        raise SystemExit(f"the tests passed but recorded no figures for {sorted(missing)}")
    return {
        "command": f"make reliability (load {load_seconds:.0f} s, {restart_cycles} SIGKILLs, "
                   f"{graceful_cycles} graceful restarts)",
        **found,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-seconds", type=float, default=300)
    p.add_argument("--restart-cycles", type=int, default=10, help="SIGKILLs of the worker under readers")
    p.add_argument("--graceful-cycles", type=int, default=3, help="graceful restarts (SIGTERM) under readers")
    p.add_argument("--out", default=str(REPO / "bench"), help="where reliability.json and RESULTS.md are")
    args = p.parse_args(argv)
    out = Path(args.out)
    figures = measure(args.load_seconds, args.restart_cycles, args.graceful_cycles)
    (out / "reliability.json").write_text(json.dumps(figures, indent=2) + "\n")
    results_path = out / "results.json"
    if results_path.exists():
        (out / "RESULTS.md").write_text(report.render(json.loads(results_path.read_text()), figures))
    print(report.render_reliability(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
