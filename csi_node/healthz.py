"""``GET /healthz`` served by the plugin itself, for clusters without the livenessprobe sidecar.

The sidecar (registry.k8s.io/sig-storage/livenessprobe) calls the plugin's Probe RPC and answers
``/healthz`` with 200 or 500; the plugin container's livenessProbe points at it. Where that
image cannot be pulled or built (its Go module is refused by the module proxy, like
node-driver-registrar's), ``datahoard csi-node --health-port`` answers the same from the same
checks the Probe RPC uses, so the container's livenessProbe stays as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

HealthCheck = Callable[[], list[str]]


class HealthServer:
    """A small HTTP server: ``/healthz`` is 200 ``ok`` when *check* finds nothing, else 500 with
    the problems (one per line); any other path is 404."""

    def __init__(self, check: HealthCheck, port: int, host: str = "") -> None:
        self.check = check
        self.address = (host, port)
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.httpd is not None, "not started"
        return self.httpd.server_address[1]

    def start(self) -> int:
        check = self.check

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/healthz":
                    self._answer(404, "not found: only /healthz is served\n")
                    return
                try:
                    problems = check()
                except Exception as exc:  # a broken check is itself unhealthy, and says so
                    problems = [f"health check failed: {exc!r}"]
                if problems:
                    self._answer(500, "".join(f"{p}\n" for p in problems))
                else:
                    self._answer(200, "ok\n")

            def _answer(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("healthz: " + format, *args)

        self.httpd = ThreadingHTTPServer(self.address, Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="csi-healthz", daemon=True)
        self._thread.start()
        log.info("serving /healthz on port %d", self.port)
        return self.port

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
