"""The operator's /metrics, served for real on a local port and read as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from datahoard.operator import metrics
from tests.support.ports import free_port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_datasets_by_phase_every_phase_exported_and_deleted_ones_gone() -> None:
    port = free_port()
    metrics.serve(port, host="127.0.0.1")
    metrics.DATASETS.set("ml/a", "Ready")
    metrics.DATASETS.set("ml/b", "Ready")
    metrics.DATASETS.set("ml/c", "Degraded")
    got = scrape(port)
    phase = lambda p: got[("datahoard_operator_datasets", (("phase", p),))]  # noqa: E731
    assert (phase("Ready"), phase("Degraded"), phase("Failed")) == (2, 1, 0)
    metrics.DATASETS.set("ml/c", "Ready")   # the phase moved: counted once, in its new phase
    metrics.DATASETS.set("ml/b", None)      # deleted
    got = scrape(port)
    assert (phase("Ready"), phase("Degraded")) == (2, 0)
    for key in ("ml/a", "ml/c"):
        metrics.DATASETS.set(key, None)
