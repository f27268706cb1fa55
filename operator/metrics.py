"""The operator's own Prometheus metrics, served on ``DATAHOARD_METRICS_PORT`` (``/metrics``).

What a platform team alerts on without reading every Dataset: how many Datasets are in each
phase, how often a reconcile fails, how long collecting the workers' stats takes and how many
workers did not answer. One registry per process (not prometheus_client's global one), so tests
and an embedding program see exactly these series.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Every phase a Dataset can have (the CRD's enum): each is exported, 0 included, so a query
#: for Degraded Datasets finds a series even while there are none.
PHASES = ("Pending", "Listing", "Warming", "Ready", "Degraded", "Failed", "Terminating")

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_ERRORS = Counter(
    "datahoard_operator_reconcile_errors", "Reconcile passes that failed (retried by the operator)",
    ["reason"], registry=REGISTRY)
STATS_SECONDS = Histogram(
    "datahoard_operator_stats_collection_seconds",
    "Time to collect GET /stats from every worker of one Dataset",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
STATS_FAILURES = Counter(
    "datahoard_operator_stats_failures", "Workers whose GET /stats failed (timeout, refused, unreadable)",
    registry=REGISTRY)


class _Phases(Collector):
    """Datasets by phase, from the phase each one had after its last reconcile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase: dict[str, str] = {}

    def set(self, key: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phase.pop(key, None)
            else:
                self._phase[key] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = Tally(self._phase.values())
        family = GaugeMetricFamily("datahoard_operator_datasets", "Datasets by phase", labels=["phase"])
        for phase in sorted(set(PHASES) | set(counts)):
            family.add_metric([phase], counts.get(phase, 0))
        yield family


DATASETS = _Phases()
REGISTRY.register(DATASETS)


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` in a daemon thread (0: not at all)."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)
