"""The reliability figures the tests record render into RESULTS.md's section (make reliability)."""

from __future__ import annotations

import json

from bench import reliability, report
from tests import results


def test_recorded_figures_render_into_the_results_section(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAHOARD_RESULTS_DIR", str(tmp_path))
    results.record("load", {
        "seconds": 20.0, "reader_threads": 64, "reader_processes": 4, "files": 201, "dataset_bytes": 60 << 20,
        "capacity_bytes": 24 << 20, "reads": 5000, "reads_per_s": 250.0, "wrong_reads": 0, "errors": 0,
        "worker_peak_rss_bytes": 90 << 20, "hit_ratio": 0.41, "cached_bytes": 20 << 20,
    })
    outage = {"failed_reads": 3, "errnos": ["ENOTCONN"], "stall_s": 2.5, "kill_to_first_ok_s": 2.4}
    results.record("restart_under_reader", {
        "cycles": 2, "files": 150, "worker_restart_s": [2.9, 3.1],
        "readers": {"rslave": {"reads_ok": 900, "reads_failed": 6, "outages": [outage, outage],
                               "median_stall_s": 2.5, "max_stall_s": 2.5}},
    })
    figures = {"command": "make reliability", **{p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}}
    text = report.render_reliability(figures)
    assert "| 5,000 | 250 | 0 | 0 | 90 | 0.410 | 20.0 |" in text
    assert "| rslave | 900 | 6 | ENOTCONN | 2.50 | 2.50 |" in text
    assert set(reliability.TESTS) == {"load", "restart_under_reader"}


def test_nothing_is_recorded_without_a_results_dir(monkeypatch):
    monkeypatch.delenv("DATAHOARD_RESULTS_DIR", raising=False)
    assert results.record("load", {"reads": 1}) is None
