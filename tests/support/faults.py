"""A fault-injecting HTTP proxy in front of the S3 server, for tests.

Real HTTP on both sides: the worker talks to the proxy exactly as it would to S3. Rules are
consumed in order by matching requests: answer with an error status, send the headers of the
real response and then cut the body short (a connection reset mid-transfer), or go silent for a
while before answering or in the middle of the body (a request that times out), drip the body
a few bytes per second (a request that never times out per read, only by a total deadline),
flip bytes of the body and deliver it whole with success (a proxy or NIC that corrupts data in
transit), or hold a request until the test lets it go (a store that is slow for some objects:
what keeps a warming cache below a threshold for as long as a test needs to look at it).
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Fault:
    method: str = "GET"
    status: int | None = None  # answer with this status instead of forwarding
    s3_code: str = "InternalError"
    cut_after: int | None = None  # forward, but close the connection after this many body bytes
    #: Seconds of silence before the connection is closed unanswered, or (with ``stall_after``)
    #: in the middle of the body: a client without a working timeout waits all of it.
    delay: float = 0.0
    stall_after: int | None = None  # send this many body bytes, stay silent ``delay``, then close
    path_contains: str = ""
    times: int = 1
    #: Forward the whole response, but XOR these many body bytes from ``flip_at`` with 0xFF (kept
    #: inside the body): wrong bytes delivered with success and the right length and headers.
    flip: int = 0
    flip_at: int = 0
    #: Forward the headers, then the body at this many bytes per second (until the client leaves).
    drip_rate: float | None = None
    #: Hold the request until this is set, then forward it. If ``hold_for`` seconds pass first:
    #: answer ``status`` if one is given (503 SlowDown: the client retries, and is held again),
    #: else forward it late.
    hold: threading.Event | None = None
    #: Kept under the worker's read timeout (30 s), so a held request is answered, never timed out.
    hold_for: float = 20.0


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.injected = 0
        #: ``host:port`` -> ``host:port`` replaced in ``Location`` headers: a NameNode's
        #: redirects sent through another proxy in front of the DataNode.
        self.redirects: dict[str, str] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take(self.command, self.path)
                if fault and fault.hold is not None:
                    if fault.hold.wait(fault.hold_for) or not fault.status:
                        fault = None
                if fault and fault.delay and fault.stall_after is None:
                    time.sleep(fault.delay)
                    self.close_connection = True
                    return
                if fault and fault.status:
                    xml = (f"<?xml version='1.0'?><Error><Code>{fault.s3_code}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() == "location":
                        for old, new in proxy.redirects.items():
                            value = value.replace(f"//{old}/", f"//{new}/", 1)
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the object's length (S3's part sizes, say).
                upstream_length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", upstream_length or str(len(data)))
                self.end_headers()
                cut = None if fault is None else fault.cut_after if fault.stall_after is None else fault.stall_after
                if cut is not None and self.command != "HEAD":
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    if fault.stall_after is not None:
                        time.sleep(fault.delay)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:  # the client gave up first
                        pass
                    return
                if fault is not None and fault.flip and data and self.command != "HEAD":
                    data = _flipped(data, fault.flip_at, fault.flip)
                if fault is not None and fault.drip_rate and self.command != "HEAD":
                    conn.close()
                    self._drip(data, fault.drip_rate)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _drip(self, data: bytes, rate: float) -> None:
                """Send ``data`` at ``rate`` bytes/s, ten pieces a second (one a second below 10 B/s)."""
                piece = max(1, int(rate / 10))
                pause = piece / rate
                self.close_connection = True
                try:
                    for at in range(0, len(data), piece):
                        self.wfile.write(data[at : at + piece])
                        self.wfile.flush()
                        time.sleep(pause)
                except OSError:  # the client gave up: what a deadline is for
                    pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and fault.path_contains in path and fault.times > 0:
                    fault.times -= 1
                    self.injected += 1
                    return fault
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _flipped(data: bytes, at: int, count: int) -> bytes:
    """``data`` with ``count`` bytes from ``at`` inverted; ``at`` is clamped into the body."""
    at = max(0, min(at, len(data) - count))
    flipped = bytes(b ^ 0xFF for b in data[at : at + count])
    return data[:at] + flipped + data[at + count :]
