"""Loopback ports for servers a test starts (moto, kube-apiserver, etcd, stats and metrics
endpoints, a fault proxy).

The kernel picks a free port and the socket is closed again before the server binds it: a
small race with other processes on the machine, which is why the servers' start-up waits report
a clear error (port taken, process exited) rather than hang.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
