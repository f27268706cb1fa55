"""Faults between the worker and the store never produce wrong bytes: reads either return the
right bytes after retries or fail with EIO, and the error names the object."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tests.support.faults import Fault, FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


def _put(s3, bucket, files):
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=503, s3_code="SlowDown", times=2),
        Fault(status=500, s3_code="InternalError", times=2),
        Fault(cut_after=1000, times=2),  # connection reset mid-body, twice
    ],
    ids=["slowdown", "5xx", "reset-mid-body"],
)
def test_transient_faults_are_retried_to_the_right_bytes(s3, bucket, mount_dataset, proxy, fault):
    files = {"small.bin": os.urandom(300_000), "large.bin": os.urandom(18 << 20)}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint)
    for key, body in files.items():
        proxy.add(Fault(**{**fault.__dict__, "path_contains": key}))
        assert (m.mountpoint / key).read_bytes() == body
    assert proxy.injected == 2 * fault.times
    assert m.stats().errors == 0


#: One attempt may wait this long on a silent store. The faults below stay silent for far longer
#: than the tests' time limit, so a missing or ignored timeout fails them instead of passing slowly.
_SHORT_TIMEOUTS = {"DATAHOARD_S3_READ_TIMEOUT": "1", "DATAHOARD_S3_CONNECT_TIMEOUT": "1"}
_SILENCE = 600
_READ_IN_CHILD = r"""
import errno, sys
try:
    sys.stdout.buffer.write(open(sys.argv[1], "rb").read())
except OSError as exc:
    sys.exit(100 + exc.errno)
"""


def read_or_hang(path, limit: float = 60) -> bytes:
    """Read a file in a child process, so a read stuck in the kernel fails the test after
    ``limit`` seconds (the child is then SIGKILLed) instead of hanging it."""
    try:
        child = subprocess.run([sys.executable, "-c", _READ_IN_CHILD, str(path)], capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung for {limit} s: the store's silence was not timed out")
    if child.returncode >= 100:
        raise OSError(child.returncode - 100, os.strerror(child.returncode - 100), str(path))
    assert child.returncode == 0, child.stderr
    return child.stdout


@pytest.mark.parametrize(
    "fault",
    [
        Fault(delay=_SILENCE, times=2),  # silent before the response starts
        Fault(delay=_SILENCE, stall_after=4096, times=2),  # silent in the middle of the body
    ],
    ids=["silent-before-headers", "silent-mid-body"],
)
def test_timed_out_requests_are_retried_to_the_right_bytes(s3, bucket, mount_dataset, proxy, fault):
    files = {"small.bin": os.urandom(300_000), "large.bin": os.urandom(18 << 20)}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint, env={**_SHORT_TIMEOUTS, "DATAHOARD_S3_MAX_ATTEMPTS": "4"})
    for key, body in files.items():
        proxy.add(Fault(**{**fault.__dict__, "path_contains": key}))
        assert read_or_hang(m.mountpoint / key) == body
    assert proxy.injected == 2 * fault.times
    assert m.stats().errors == 0


def test_a_store_that_stays_silent_is_eio_naming_the_object(s3, bucket, mount_dataset, proxy):
    _put(s3, bucket, {"silent.bin": os.urandom(50_000)})
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint, env=_SHORT_TIMEOUTS)
    proxy.add(Fault(delay=_SILENCE, stall_after=1000, path_contains="silent.bin", times=100))
    with pytest.raises(OSError) as info:
        read_or_hang(m.mountpoint / "silent.bin")
    assert info.value.errno == errno.EIO
    assert "silent.bin" in m.stats().last_error


def test_persistent_failure_is_eio_naming_the_object(s3, bucket, mount_dataset, proxy):
    _put(s3, bucket, {"broken.bin": os.urandom(10_000)})
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint)
    proxy.add(Fault(status=500, path_contains="broken.bin", times=100))
    with pytest.raises(OSError) as info:
        (m.mountpoint / "broken.bin").read_bytes()
    assert info.value.errno == errno.EIO
    stats = m.stats()
    assert stats.errors >= 1 and "broken.bin" in stats.last_error


def test_object_replaced_during_a_read_is_never_mixed(s3, bucket, mount_dataset):
    """A large object is fetched and checked whole on its first read (cache_worker/verify.py), so
    one replaced after that read keeps serving the listed version; one replaced before its first
    read is EIO. Never bytes of two versions, never the new bytes under the old listing."""
    old = os.urandom(80 << 20)
    _put(s3, bucket, {"shard.bin": old, "other.bin": old[: 20 << 20]})
    m = mount_dataset(bucket, "ds")
    with open(m.mountpoint / "shard.bin", "rb") as f:
        assert os.pread(f.fileno(), 4096, 0) == old[:4096]
        _put(s3, bucket, {"shard.bin": os.urandom(80 << 20)})
        assert os.pread(f.fileno(), 4096, 72 << 20) == old[72 << 20 : (72 << 20) + 4096]
    _put(s3, bucket, {"other.bin": os.urandom(20 << 20)})
    with open(m.mountpoint / "other.bin", "rb") as f:
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 12 << 20)
        assert info.value.errno == errno.EIO
    assert "changed since it was listed" in m.stats().last_error
