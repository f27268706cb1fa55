"""A slow store never freezes the worker: every source request has a total deadline, reads that
wait on the source are bounded, and metadata and cache hits never wait behind fetches.

Real parts throughout: the S3 server (moto over HTTP) behind the fault proxy, real FUSE mounts
through ``datahoard mount``. Reads run in child processes (``read_or_hang``) so that a missing
bound fails the test after a generous limit instead of hanging it; every fault lasts far longer
than those limits.
"""

from __future__ import annotations

import os
import time

import pytest

from datahoard.cache_worker.s3 import S3Options, S3Source
from datahoard.cache_worker.source import RemoteObject, SourceTransientError
from tests.support.faults import Fault, FaultProxy
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

#: A store that sends one byte a second: no single recv ever waits long, so only a total
#: deadline per request ends it.
_DRIP = 1.0


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


def _source(proxy: FaultProxy, uri: str, **opts) -> S3Source:
    return S3Source(uri, S3Options(endpoint_url=proxy.endpoint, max_attempts=2, read_timeout=5,
                                   request_timeout=2, **opts))


@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_a_dripping_chunk_get_ends_within_its_deadline(s3, bucket, proxy, client):
    body = os.urandom(20_000)
    s3.put_object(Bucket=bucket, Key="ds/drip.bin", Body=body)
    etag = s3.head_object(Bucket=bucket, Key="ds/drip.bin")["ETag"].strip('"')
    src = _source(proxy, f"s3://{bucket}/ds", client=client)
    obj = RemoteObject("drip.bin", len(body), etag, 0.0)
    proxy.add(Fault(drip_rate=_DRIP, path_contains="drip.bin", times=100))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"s3://.*/ds/drip\.bin.*timed out"):
        src.read(obj, 0, len(body))
    # Two attempts of 2 s and a backoff; per-recv timeouts alone would take 20,000 s.
    assert time.monotonic() - started < 15
    proxy.faults.clear()
    assert src.read(obj, 0, len(body)) == body  # the cut connections left nothing behind


def test_a_dripping_listing_page_ends_within_its_deadline(s3, bucket, proxy):
    s3.put_object(Bucket=bucket, Key="ds/a", Body=b"x")
    src = _source(proxy, f"s3://{bucket}/ds")
    proxy.add(Fault(drip_rate=_DRIP, path_contains="list-type", times=100))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"listing s3://.*/ds/ timed out"):
        list(src.list())
    assert time.monotonic() - started < 20
    proxy.faults.clear()
    assert [o.key for o in src.list()] == ["a"]


# -- through the FUSE view -------------------------------------------------------------------
_SILENCE = 600  # seconds a stuck request stays silent: far beyond every limit below

_IN_CHILD = r"""
import os, sys, time
what, path = sys.argv[1], sys.argv[2]
started = time.monotonic()
try:
    if what == "stat":
        os.stat(path)
    elif what == "listdir":
        os.listdir(path)
    elif what == "read":
        sys.stdout.buffer.write(open(path, "rb").read())
    elif what == "pread":
        fd = os.open(path, os.O_RDONLY)
        sys.stdout.buffer.write(os.pread(fd, 1 << 20, 0))
except OSError as exc:
    sys.stderr.write(f"{time.monotonic() - started:.3f}\n")
    sys.exit(100 + exc.errno)
sys.stderr.write(f"{time.monotonic() - started:.3f}\n")
"""


def in_child(what: str, path, limit: float) -> tuple[bytes, float]:
    """``what`` (stat, listdir, read, pread) on ``path`` in a child process, so an operation
    stuck in the kernel fails the test after ``limit`` seconds instead of hanging it. Returns
    the bytes read and the seconds the operation took; raises OSError as the operation did."""
    import subprocess
    import sys

    try:
        child = subprocess.run([sys.executable, "-c", _IN_CHILD, what, str(path)],
                               capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} of {path} was still waiting after {limit} s")
    took = float(child.stderr.decode().strip().splitlines()[-1])
    if child.returncode >= 100:
        code = child.returncode - 100
        raise OSError(code, f"{os.strerror(code)} after {took:.1f} s", str(path))
    assert child.returncode == 0, child.stderr
    return child.stdout, took


def _drop_page_cache(path) -> None:
    """Make the next read of ``path`` reach the worker (the kernel kept what was read before)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: Fetches that stay stuck for minutes, and readers that would wait for them as long.
_STUCK_ENV = {"DATAHOARD_S3_READ_TIMEOUT": str(_SILENCE), "DATAHOARD_S3_REQUEST_TIMEOUT": str(_SILENCE),
              "DATAHOARD_READ_WAIT": str(_SILENCE)}


def test_metadata_and_cache_hits_are_answered_while_fetches_are_stuck(s3, bucket, mount_dataset, proxy):
    import subprocess

    stuck = 14  # more than libfuse's default of 10 threads and the kernel's 12 background reads
    cached, big = os.urandom(300_000), os.urandom(18 << 20)
    bodies = {"cached.bin": cached, "big.bin": big}
    bodies.update({f"stuck/f{i:02}": os.urandom(1000) for i in range(stuck)})
    bodies.update({f"dir/f{i:02}": b"x" for i in range(20)})
    for key, body in bodies.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint, env=_STUCK_ENV)
    assert (m.mountpoint / "cached.bin").read_bytes() == cached
    with open(m.mountpoint / "big.bin", "rb") as f:
        assert os.pread(f.fileno(), 1 << 20, 0) == big[: 1 << 20]
    _drop_page_cache(m.mountpoint / "cached.bin")
    _drop_page_cache(m.mountpoint / "big.bin")

    proxy.add(Fault(delay=_SILENCE, path_contains="/ds/stuck/", times=1000))
    readers = [subprocess.Popen(["cat", str(m.mountpoint / "stuck" / f"f{i:02}")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i in range(stuck)]
    try:
        # At least libfuse's default thread count (before the fix, only that many got through).
        eventually(lambda: proxy.injected >= 10, 60, "10 fetches stuck on the store")
        time.sleep(2)  # let the other stuck reads settle on their libfuse threads
        assert all(r.poll() is None for r in readers), "the stuck reads should still be waiting"
        # Each of these waited 145 s and more before the fix; 10 s is generous on a loaded machine.
        _, took = in_child("stat", m.mountpoint / "dir" / "f07", limit=60)
        assert took < 10
        _, took = in_child("listdir", m.mountpoint / "dir", limit=60)
        assert took < 10
        data, took = in_child("read", m.mountpoint / "cached.bin", limit=60)
        assert data == cached and took < 10
        data, took = in_child("pread", m.mountpoint / "big.bin", limit=60)
        assert data == big[: 1 << 20] and took < 10
    finally:
        for r in readers:
            r.kill()
            r.wait()


def test_a_dripping_store_ends_a_read_within_its_deadline(s3, bucket, mount_dataset, proxy):
    body = os.urandom(50_000)
    s3.put_object(Bucket=bucket, Key="ds/drip.bin", Body=body)
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint,
                      env={"DATAHOARD_S3_REQUEST_TIMEOUT": "3", "DATAHOARD_S3_MAX_ATTEMPTS": "2"})
    proxy.add(Fault(drip_rate=_DRIP, path_contains="drip.bin", times=100))
    with pytest.raises(OSError) as info:
        in_child("read", m.mountpoint / "drip.bin", limit=90)
    assert info.value.errno == 5  # EIO
    stats = m.stats()
    assert "drip.bin" in stats.last_error and "timed out" in stats.last_error
    proxy.faults.clear()
    assert in_child("read", m.mountpoint / "drip.bin", limit=60)[0] == body


def test_a_later_reader_does_not_join_a_stuck_fetch(s3, bucket, mount_dataset, proxy):
    small, big = os.urandom(100_000), os.urandom(18 << 20)
    s3.put_object(Bucket=bucket, Key="ds/late.bin", Body=small)
    s3.put_object(Bucket=bucket, Key="ds/late-big.bin", Body=big)
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint,
                      env={**_STUCK_ENV, "DATAHOARD_READ_WAIT": "3"})
    for name, body in (("late.bin", small), ("late-big.bin", big)):
        injected = proxy.injected
        proxy.add(Fault(delay=_SILENCE, path_contains=name, times=1))  # then the store recovers
        # The first read's fetch stays stuck for minutes; the read ends after 3 s (it waited
        # the whole 600 s before the fix): with EIO, or with the right bytes when the kernel
        # retried the read itself and that retry fetched afresh.
        try:
            data, took = in_child("read", m.mountpoint / name, limit=60)
            assert data == body
        except OSError as exc:
            assert exc.errno == 5
            assert name in m.stats().last_error
        assert proxy.injected == injected + 1
        _drop_page_cache(m.mountpoint / name)
        data, took = in_child("read", m.mountpoint / name, limit=60)
        assert data == body and took < 30


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize(
    "fault",
    [Fault(drip_rate=_DRIP, path_contains="list-type", times=1000),
     Fault(delay=_SILENCE, path_contains="list-type", times=1000)],
    ids=["dripping", "silent"],
)
def test_a_slow_listing_makes_mount_fail_clearly(s3, bucket, proxy, tmp_path, fault):
    import signal
    import subprocess

    from tests.support.mounts import datahoard, force_unmount

    s3.put_object(Bucket=bucket, Key="ds/a", Body=b"x")
    proxy.add(fault)
    mountpoint, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    env = {"DATAHOARD_S3_REQUEST_TIMEOUT": "3", "DATAHOARD_S3_READ_TIMEOUT": "2",
           "DATAHOARD_S3_MAX_ATTEMPTS": "2"}
    try:
        result = datahoard("mount", f"s3://{bucket}/ds", str(mountpoint), "--cache-dir", str(cache_dir),
                           "--endpoint-url", proxy.endpoint, check=False, env=env, timeout=90)
    except subprocess.TimeoutExpired:
        for pid in _processes_mentioning(str(cache_dir)):
            os.kill(pid, signal.SIGKILL)
        force_unmount(mountpoint)
        pytest.fail("datahoard mount was still waiting on the listing after 90 s")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("datahoard: error: listing s3://") and "timed out" in lines[0], lines[0]
    assert not os.path.ismount(mountpoint)
    time.sleep(0.5)
    assert _processes_mentioning(str(cache_dir)) == []
