"""The reliability figures the tests record render into RESULTS.md's section (make reliability)."""

from __future__ import annotations

import json

from bench import reliability, report

from tests.support import results


def test_recorded_figures_render_into_the_results_section(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAHOARD_RESULTS_DIR", str(tmp_path))
    results.record("load", {
        "seconds": 20.0, "reader_threads": 64, "reader_processes": 4, "files": 201, "dataset_bytes": 60 << 20,
        "capacity_bytes": 24 << 20, "reads": 5000, "reads_per_s": 250.0, "wrong_reads": 0, "errors": 0,
        "worker_peak_rss_bytes": 90 << 20, "hit_ratio": 0.41, "cached_bytes": 20 << 20,
    })
    results.record("restart_under_reader", {
        "kills": 2, "graceful": 1, "files": 150, "worker_restart_s": [2.9, 3.1, 2.4],
        "readers": {"rslave": {"reads_ok": 900, "reads_failed": 0, "kill_stall_s": {"median": 1.0, "max": 2.0},
                               "graceful_stall_s": {"median": 2.4, "max": 2.4}}},
    })
    figures = {"command": "make reliability", **{p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}}
    text = report.render_reliability(figures)
    assert "| 5,000 | 250 | 0 | 0 | 90 | 0.410 | 20.0 |" in text
    assert "| rslave | 900 | 0 | 1.00 / 2.00 | 2.40 / 2.40 |" in text
    assert set(reliability.TESTS) == {"load", "restart_under_reader"}


def test_nothing_is_recorded_without_a_results_dir(monkeypatch):
    monkeypatch.delenv("DATAHOARD_RESULTS_DIR", raising=False)
    assert results.record("load", {"reads": 1}) is None
