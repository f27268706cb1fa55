"""The view lets go of what an open directory holds: listing a directory again and again must
not grow the worker (RSS per indexed file is one of issue 17's targets)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from datahoard import runtime

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _anon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def test_listing_a_directory_many_times_does_not_grow_the_worker(s3, bucket, mount_dataset):
    names = [f"image_{i:05d}_with_a_name_as_long_as_real_ones.jpg" for i in range(500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3.put_object(Bucket=bucket, Key="ds/d/" + n, Body=b"x"), names))
    m = mount_dataset(bucket, "ds")
    pid = runtime.lookup(m.mountpoint).pid
    for _ in range(20):  # settle: every session thread's first listing, caches filled
        assert sorted(os.listdir(m.mountpoint / "d")) == names
    before = _anon_rss(pid)
    for _ in range(400):  # 200,000 entries listed
        assert len(os.listdir(m.mountpoint / "d")) == len(names)
    grown = _anon_rss(pid) - before
    # Each listing builds the directory's entries (about 100 KB here) and RELEASEDIR drops them;
    # RELEASEDIR failed (a handler signature mismatch) and kept them all: about 45 MB here.
    assert grown < 12 * MiB, f"the worker grew by {grown / MiB:.1f} MiB over 400 listings"
    log = (m.cache_dir / "worker.log").read_text()
    assert "answered EIO" not in log, log[-2000:]
