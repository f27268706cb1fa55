"""The worker's Prometheus metrics (``/metrics`` of :mod:`.stats_server`): made from the same
stats snapshot ``/stats`` returns, at each scrape, so the two never disagree."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from datahoard.stats import WorkerStats


class StatsCollector:
    """Prometheus view of the same snapshot ``/stats`` returns, so the two never disagree."""

    def __init__(self, snapshot: Callable[[], WorkerStats]) -> None:
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        labels = ["source"]
        value = [s.source]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"datahoard_{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"datahoard_{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("ready", "1 when the FUSE view is live", 1.0 if s.ready else 0.0)
        yield gauge("files", "files in the dataset view", s.files)
        yield gauge("total_bytes", "bytes in the dataset view", s.total_bytes)
        yield gauge("cached_bytes", "bytes held in the local cache", s.cached_bytes)
        yield gauge("capacity_bytes", "cache capacity", s.capacity_bytes)
        yield gauge("hit_ratio", "bytes served from cache / bytes served", s.hit_ratio)
        served = CounterMetricFamily(
            "datahoard_served_bytes", "bytes served to readers", labels=[*labels, "origin"]
        )
        served.add_metric([*value, "cache"], s.served_from_cache_bytes)
        served.add_metric([*value, "source"], s.served_from_source_bytes)
        yield served
        reads = CounterMetricFamily("datahoard_reads", "read requests", labels=[*labels, "result"])
        reads.add_metric([*value, "hit"], s.hits)
        reads.add_metric([*value, "miss"], s.misses)
        yield reads
        yield counter("fetched_bytes", "bytes fetched from the source", s.fetched_bytes)
        yield counter("errors", "failed reads and fills", s.errors)
        yield counter("skipped_keys", "object keys left out of the view", s.skipped_keys)
        yield gauge("unverified_objects", "objects served with nothing from the store to check them against",
                    s.unverified_objects)
        yield counter("integrity_mismatches", "fetched objects that failed the store's checksum (dropped, refetched)",
                      s.integrity_mismatches)
        yield gauge("warm_bytes_done", "bytes warmed", s.warming.bytes_done)
        yield gauge("warm_files_done", "files warmed", s.warming.files_done)
        yield gauge("warm_bytes_per_second", "warming rate", s.warming.bytes_per_second)
        yield gauge("serving_direct", "1 while new opens are served from the direct tree (no FUSE hop; "
                    "each open counts its whole file as served from the cache)", 1.0 if s.serving == "direct" else 0.0)
        consumers = CounterMetricFamily(
            "datahoard_consumer_served_bytes",
            "bytes served to each consumer (pod): the top 20 by bytes, the rest summed "
            "as pod=\"other\" (which can fall when a consumer enters the top 20; the sum over pods never does)",
            labels=[*labels, "namespace", "pod", "origin"])
        for c in s.consumers:
            consumers.add_metric([*value, c.namespace, c.pod, "cache"], c.served_from_cache_bytes)
            consumers.add_metric([*value, c.namespace, c.pod, "source"], c.served_from_source_bytes)
        yield consumers
        yield gauge("direct_tree_files", "files in the direct tree", s.direct.files)
        yield gauge("direct_tree_bytes", "bytes of the dataset in the direct tree", s.direct.bytes)
        yield gauge("direct_tree_assembled_bytes", "bytes of large files the direct tree assembled (own space)",
                    s.direct.assembled_bytes)


__all__ = ["StatsCollector"]
