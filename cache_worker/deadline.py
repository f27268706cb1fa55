"""A total time limit per source request: connect, headers and the whole body.

urllib3's (and botocore's) read timeout bounds each ``recv``, not a request: a store that sends
one byte a second, or a listing page that drips, keeps a caller waiting for days. Here a
request runs inside a :class:`Deadline` scope, and one watchdog thread shuts down the socket of
the connection the request is using once the scope's time is up. The blocked ``recv`` then
returns at once (end of stream, or an error) wherever the request is: waiting for headers,
reading them, or reading the body; the caller sees :attr:`Deadline.expired` and reports a
timeout naming the object.

Connections learn which scope they serve through a thread-local: the connection classes below
(for urllib3 pools: our lean S3 GETs, WebHDFS, and botocore's pools) attach their socket to the
calling thread's current scope whenever they connect or send a request. A connection attached
to a scope that has already expired is cut at once, so retries inside an expired scope fail
fast instead of starting over.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time

import urllib3
import urllib3.connection


class DeadlineExceeded(TimeoutError):
    """A request did not complete within its total deadline."""


class Deadline:
    """One request's time limit; use as a context manager on the thread making the request.

    :meth:`rearm` starts the clock again for another request inside one scope (the next
    NameNode of an HA list in ``webhdfs.py``, botocore's region redirect in ``s3_client.py``), so each
    gets the full time; retries are :mod:`.retry`'s, each attempt in a scope of its own.
    """

    def __init__(self, seconds: float, what: str = "the request", setting: str = "") -> None:
        self.seconds = seconds
        self.what = what
        self.setting = setting  # the knob that sets ``seconds``, named in the error
        self.expired = False
        #: How many times the time ran out in this scope (requests sent again within it).
        self.fired = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._due = 0.0
        self._outer: Deadline | None = None

    # -- scope -----------------------------------------------------------------------------
    def __enter__(self) -> "Deadline":
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        self.rearm()
        return self

    def __exit__(self, *exc: object) -> None:
        _current.deadline = self._outer
        with self._lock:
            self._due = 0.0  # the watchdog drops it
            self._socks.clear()

    def rearm(self) -> None:
        """Give the request (or its next attempt) the full time again, from now."""
        with self._lock:
            self.expired = False
            self._socks.clear()  # sockets of an earlier attempt are none of this one's business
            self._due = time.monotonic() + self.seconds
        _watchdog.watch(self)

    def remaining(self) -> float:
        return max(0.0, self._due - time.monotonic())

    def error(self) -> DeadlineExceeded:
        knob = f" ({self.setting})" if self.setting else ""
        return DeadlineExceeded(
            f"{self.what} timed out: no complete answer in {self.seconds:g} s{knob}")

    # -- the watchdog's side ---------------------------------------------------------------
    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _cut(sock)
            elif self._due:
                self._socks.append(sock)

    def _expire(self, due: float) -> None:
        with self._lock:
            if self._due != due:  # rearmed or finished since it was scheduled
                return
            self.expired = True
            self.fired += 1
            socks, self._socks = self._socks, []
        for sock in socks:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    """Wake every thread blocked on ``sock``: shut the socket down (the owner closes it).

    The plain socket's method even for TLS sockets: ``SSLSocket.shutdown`` also drops the TLS
    state, under a thread that may be inside it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass


class _Watchdog:
    """One daemon thread and a heap of due times, started on first use."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline._due, next(self._seq), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                due, _, deadline = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline._expire(due)


_watchdog = _Watchdog()


class _Current(threading.local):
    deadline: Deadline | None = None


_current = _Current()


def current() -> Deadline | None:
    """The calling thread's innermost deadline scope, if any."""
    return _current.deadline


def _attach_current(conn) -> None:
    deadline = _current.deadline
    sock = getattr(conn, "sock", None)
    if deadline is not None and sock is not None:
        deadline._attach(sock)


class CutOnDeadline:
    """Mixin for urllib3 connection classes: attach the socket to the current deadline scope."""

    def connect(self) -> None:
        super().connect()
        _attach_current(self)

    def request(self, *args, **kwargs):
        _attach_current(self)  # a kept-alive connection: already connected
        return super().request(*args, **kwargs)


class HTTPConnection(CutOnDeadline, urllib3.connection.HTTPConnection):
    pass


class HTTPSConnection(CutOnDeadline, urllib3.connection.HTTPSConnection):
    pass


class HTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = HTTPConnection


class HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = HTTPSConnection


#: For ``PoolManager.pool_classes_by_scheme``.
POOL_CLASSES = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
