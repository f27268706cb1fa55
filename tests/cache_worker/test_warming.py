"""Warming: prefetch everything, report progress, and always yield to application reads."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.integration


def test_warm_and_wait_caches_everything(s3, bucket, mount_dataset):
    files = {f"c{i % 3}/f{i}.bin": os.urandom(50_000 + i) for i in range(30)}
    files["shard.bin"] = os.urandom(19 << 20)
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    total = sum(map(len, files.values()))
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--parallelism", "4")
    stats = m.stats()
    w = stats.warming
    assert (w.state, w.files_done, w.files_total, w.bytes_done, w.bytes_total) == ("done", 31, 31, total, total)
    assert stats.cached_bytes == total and stats.fetched_bytes == total
    assert w.bytes_per_second > 0
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
    after = m.stats()
    assert after.fetched_bytes == total  # nothing more came from the source
    assert after.served_from_source_bytes == 0 and after.hit_ratio == 1.0


def test_reads_take_priority_over_warming(s3, bucket, mount_dataset):
    """Warming is capped at 1 MB/s over 12 MB; a read of a file warming has not reached yet
    is answered straight from the source while warming is still running, and warming
    reports progress meanwhile."""
    files = {f"f{i:02d}.bin": os.urandom(500_000) for i in range(24)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds", "--warm", "--parallelism", "2", "--bandwidth-limit", "1M")
    deadline = time.monotonic() + 30
    while m.stats().warming.bytes_done == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    last = "f23.bin"  # warming goes in name order: this one is last
    assert (m.mountpoint / last).read_bytes() == files[last]
    stats = m.stats()
    assert stats.warming.state == "running"
    assert 0 < stats.warming.bytes_done < stats.warming.bytes_total
    assert stats.served_from_source_bytes == len(files[last])


def test_warming_stops_at_the_capacity_and_says_so(s3, bucket, mount_dataset):
    for i in range(12):
        s3.put_object(Bucket=bucket, Key=f"ds/f{i:02d}.bin", Body=os.urandom(200_000))
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--capacity", "1Mi")
    w = m.stats().warming
    assert w.state == "done" and w.files_done < w.files_total
    assert "stopped at the cache capacity" in w.message
    assert m.stats().cached_bytes <= 1 << 20
