"""HTTP endpoint of a worker: ``/stats`` (JSON, the shared model), ``/metrics`` (Prometheus),
``/healthz`` (200 while the FUSE view is live) and ``/snapshot/<id>`` (the listing snapshot the
worker serves, gzip, for peers that join later: cache_worker/snapshot.py).

A handful of scrapes a minute, but any pod (or user) that can reach the port can open
connections: what each one may hold is bounded (see :class:`StatsServer`).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from datahoard.stats import WorkerStats

from .stats_metrics import StatsCollector

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    """Answers one request whose head the server has already read in full (``head``)."""

    routes: Callable[[_Handler, str], None]
    post_routes: Callable[[_Handler, str], None]

    def __init__(self, sock: socket.socket, client_address, server, head: bytes) -> None:
        self._head = head
        super().__init__(sock, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BytesIO(self._head)  # nothing more is read from the socket

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.routes(self.path.split("?", 1)[0])

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.post_routes(self.path)

    def send_body(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, path: Path, ctype: str, timeout: float) -> None:
        """A file as it is on disk (the kernel copies it: ``sendfile``), within ``timeout``."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            self.connection.settimeout(timeout)
            self.connection.sendfile(f)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("stats %s", fmt % args)


def _loopback(address) -> bool:
    try:
        ip = ipaddress.ip_address(address[0])
    except (ValueError, IndexError, TypeError):
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class _Pending:
    """A connection that has not yet sent a whole request head."""

    __slots__ = ("sock", "address", "head", "deadline")

    def __init__(self, sock: socket.socket, address, deadline: float) -> None:
        self.sock, self.address, self.head, self.deadline = sock, address, bytearray(), deadline


class StatsServer:
    """The endpoint, with every resource a client can hold bounded.

    ``http.server``'s ThreadingHTTPServer gives each connection a thread that waits for the
    request with no timeout: 1,500 idle sockets held 1,505 threads and, at the descriptor limit,
    the FUSE view's uncached reads failed. Here one thread reads request heads from every
    connection at once (a selector), so an idle or slow client costs a descriptor, not a thread;
    at most :attr:`MAX_PENDING` such connections are kept (a new one pushes out the oldest, so a
    client that asks promptly is still answered while others hold sockets open) and each gets
    :attr:`HEAD_TIMEOUT` seconds to send its head. Complete requests are answered by
    :attr:`THREADS` threads, at most :attr:`MAX_QUEUED` waiting (503 beyond), each write bounded
    by :attr:`WRITE_TIMEOUT`. One request per connection (HTTP/1.0), as before.
    """

    MAX_PENDING = 64
    HEAD_TIMEOUT = 10.0
    MAX_HEAD = 16 * 1024
    THREADS = 4
    MAX_QUEUED = 32
    WRITE_TIMEOUT = 10.0

    #: Seconds to send a whole snapshot file (tens of MB for a million objects).
    SNAPSHOT_WRITE_TIMEOUT = 300.0

    def __init__(
        self, address: tuple[str, int], snapshot: Callable[[], WorkerStats], healthy: Callable[[], bool],
        snapshot_file: Callable[[str], Path | None] | None = None,
        refresh: Callable[[dict[str, list[str]]], tuple[int, str]] | None = None,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(snapshot))

        def routes(handler: _Handler, path: str) -> None:
            if path == "/stats":
                handler.send_body(200, "application/json", snapshot().model_dump_json().encode())
            elif path == "/metrics":
                handler.send_body(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path.startswith("/snapshot/") and snapshot_file is not None:
                file = snapshot_file(path.removeprefix("/snapshot/"))
                if file is None:
                    handler.send_body(404, "text/plain", b"this worker does not hold that snapshot\n")
                else:
                    handler.send_file(file, "application/gzip", self.SNAPSHOT_WRITE_TIMEOUT)
            elif path == "/healthz":
                ok = healthy()
                handler.send_body(200 if ok else 503, "text/plain", b"ok\n" if ok else b"not mounted\n")
            else:
                handler.send_body(404, "text/plain", b"not found\n")

        def post_routes(handler: _Handler, target: str) -> None:
            path, _, query = target.partition("?")
            if path != "/refresh" or refresh is None:
                handler.send_body(404, "text/plain", b"not found\n")
            elif not _loopback(handler.client_address):
                # Only the node itself may ask (``datahoard refresh``): the stats port is open to
                # scrapers and peers, and a refresh lists a tenant's bucket.
                handler.send_body(403, "text/plain", b"a refresh is asked from this machine only\n")
            else:
                code, text = refresh(parse_qs(query))
                handler.send_body(code, "text/plain", (text + "\n").encode())

        self._handler = type("Handler", (_Handler,), {"routes": routes, "post_routes": post_routes})
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.create_server(address, family=family, backlog=128)
        self._sock.setblocking(False)
        self.server_address = self._sock.getsockname()
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "", "::"):
            # Bound to every address: advertise the pod's IP (downward API) so that other pods,
            # such as the CSI node plugin, can reach it; on a plain machine, loopback.
            host = os.environ.get("POD_IP") or "127.0.0.1"
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._queued = threading.BoundedSemaphore(self.MAX_QUEUED)
        self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="stats")
        self._thread = threading.Thread(target=self._loop, name="stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the selector thread ---------------------------------------------------------------
    def _loop(self) -> None:
        sel = self._selector
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                wait = 1.0
                if self._pending:
                    wait = max(0.0, min(wait, next(iter(self._pending.values())).deadline - time.monotonic()))
                for key, _ in sel.select(wait):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(64)
                    else:
                        self._read(key.fileobj)
                self._expire()
        except Exception:  # noqa: BLE001 - the endpoint is lost, the mount keeps serving
            log.exception("the stats endpoint stopped")
        finally:
            for conn in list(self._pending):
                self._drop(conn)
            sel.close()
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        for _ in range(self.MAX_PENDING):  # what is queued now, then back to reading
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: make room rather than spin
                log.warning("stats endpoint cannot accept: %s", exc)
                if self._pending:
                    self._drop(next(iter(self._pending)))
                return
            if len(self._pending) >= self.MAX_PENDING:
                self._drop(next(iter(self._pending)))
            conn.setblocking(False)
            self._pending[conn] = _Pending(conn, address, time.monotonic() + self.HEAD_TIMEOUT)
            self._selector.register(conn, selectors.EVENT_READ, "read")

    def _read(self, conn: socket.socket) -> None:
        pending = self._pending.get(conn)
        if pending is None:
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        pending.head += data
        if b"\r\n\r\n" in pending.head or b"\n\n" in pending.head:
            self._selector.unregister(conn)
            del self._pending[conn]
            self._dispatch(pending)
        elif len(pending.head) > self.MAX_HEAD:
            self._drop(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            conn, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                return
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if self._pending.pop(conn, None) is not None:
            self._selector.unregister(conn)
        conn.close()

    def _dispatch(self, pending: _Pending) -> None:
        if not self._queued.acquire(blocking=False):
            try:
                pending.sock.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            pending.sock.close()
            return
        try:
            self._pool.submit(self._answer, pending)
        except RuntimeError:  # shutting down
            self._queued.release()
            pending.sock.close()

    # -- the answering threads -------------------------------------------------------------
    def _answer(self, pending: _Pending) -> None:
        sock = pending.sock
        try:
            sock.settimeout(self.WRITE_TIMEOUT)
            self._handler(sock, pending.address, self, bytes(pending.head))
            sock.shutdown(socket.SHUT_WR)
        except Exception as exc:  # noqa: BLE001 - a client that went away
            log.debug("stats request from %s failed: %s", pending.address, exc)
        finally:
            sock.close()
            self._queued.release()
