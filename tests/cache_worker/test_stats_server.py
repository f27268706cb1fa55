"""The stats endpoint of a real mount under clients that hold connections open and say nothing."""

from __future__ import annotations

import os
import resource
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from datahoard import runtime

pytestmark = pytest.mark.integration

IDLE = 1000


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def settled_threads(pid: int, timeout: float = 60) -> int:
    """The worker's thread count once it has stopped changing for a second: `datahoard mount`
    returns when the view answers, and on a loaded machine the rest of the FUSE threads may
    still be starting then (67 of 86 were up in one CI run)."""
    deadline = time.monotonic() + timeout
    last, since = threads(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = threads(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1:
            return now
    raise AssertionError(f"the worker's thread count did not settle in {timeout} s (last {last})")


def open_idle(host: str, port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        out.append(s)
    return out


def test_idle_connections_hold_no_threads_and_stats_still_answers(s3, bucket, mount_dataset):
    files = {f"f{i}.bin": os.urandom(3000 + i) for i in range(3)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds")
    record = runtime.lookup(m.mountpoint)
    url = urlsplit(record.stats_url)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, IDLE + 512)), hard))
    before = settled_threads(record.pid)
    idle = open_idle(url.hostname, url.port, IDLE)
    try:
        # Some have sent part of a request and stalled (slowloris), the rest nothing.
        for s in idle[: IDLE // 2]:
            try:
                s.send(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass  # already pushed out: that is the point
        time.sleep(1)  # let the worker accept them all (a thread each, before)
        assert threads(record.pid) <= before + 8, f"{threads(record.pid)} threads, {before} before"
        # /stats still answers, and the view still reads uncached files.
        started = time.monotonic()
        with urllib.request.urlopen(record.stats_url + "/stats", timeout=10) as response:
            assert response.status == 200 and b'"files":3' in response.read()
        assert time.monotonic() - started < 10
        assert {k: (m.mountpoint / k).read_bytes() for k in files} == files
        assert threads(record.pid) <= before + 8
        # The worker holds a bounded number of those sockets, not one each.
        worker_fds = len(os.listdir(f"/proc/{record.pid}/fd"))
        assert worker_fds < IDLE // 2, f"the worker holds {worker_fds} descriptors"
    finally:
        for s in idle:
            s.close()
    with urllib.request.urlopen(record.stats_url + "/healthz", timeout=10) as response:
        assert response.status == 200
