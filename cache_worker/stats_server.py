"""HTTP endpoint of a worker: ``/stats`` (JSON, the shared model), ``/metrics`` (Prometheus)
and ``/healthz`` (200 while the FUSE view is live).

The standard library's threading HTTP server is enough: a handful of scrapes a minute.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from datahoard.stats import WorkerStats

log = logging.getLogger(__name__)


class _StatsCollector:
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
        yield gauge("warm_bytes_done", "bytes warmed", s.warming.bytes_done)
        yield gauge("warm_files_done", "files warmed", s.warming.files_done)
        yield gauge("warm_bytes_per_second", "warming rate", s.warming.bytes_per_second)
        yield gauge("serving_direct", "1 while new opens are served from the direct tree (no FUSE hop; "
                    "such reads are not counted in served bytes or the hit ratio)", 1.0 if s.serving == "direct" else 0.0)
        yield gauge("direct_tree_files", "files in the direct tree", s.direct.files)
        yield gauge("direct_tree_bytes", "bytes of the dataset in the direct tree", s.direct.bytes)
        yield gauge("direct_tree_assembled_bytes", "bytes of large files the direct tree assembled (own space)",
                    s.direct.assembled_bytes)


class StatsServer:
    def __init__(
        self, address: tuple[str, int], snapshot: Callable[[], WorkerStats], healthy: Callable[[], bool]
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_StatsCollector(snapshot))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/stats":
                    self._send(200, "application/json", snapshot().model_dump_json().encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    ok = healthy()
                    self._send(200 if ok else 503, "text/plain", b"ok\n" if ok else b"not mounted\n")
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("stats %s", fmt % args)

        self._server = ThreadingHTTPServer(address, Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        if host in ("0.0.0.0", ""):
            # Bound to every address: advertise the pod's IP (downward API) so that other pods,
            # such as the CSI node plugin, can reach it; on a plain machine, loopback.
            host = os.environ.get("POD_IP") or "127.0.0.1"
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
