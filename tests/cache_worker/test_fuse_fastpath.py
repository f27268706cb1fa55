"""The cheap warm path of the FUSE view: opens of files known to be cached (passed through, or
kept in the page cache) that skip the index and the store, without losing a counted byte."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.polling import eventually


@pytest.mark.integration
def test_concurrent_warm_opens_count_every_byte(s3, bucket, mount_dataset):
    bodies = {f"d{i % 4}/f{i}": os.urandom(3000 + 997 * i) for i in range(40)}
    for name, body in bodies.items():
        s3.put_object(Bucket=bucket, Key="ds/" + name, Body=body)
    m = mount_dataset(bucket, "ds")
    total = sum(map(len, bodies.values()))

    def read(name: str) -> bool:
        return (m.mountpoint / name).read_bytes() == bodies[name]

    assert all(map(read, bodies))  # misses: every file fetched once
    eventually(lambda: m.stats().served_from_source_bytes == total, 20, "every miss counted")
    epochs = 3
    with ThreadPoolExecutor(8) as pool:  # opens of cached files from many threads at once
        assert all(pool.map(read, list(bodies) * epochs))

    def settled():
        stats = m.stats()
        assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (total, epochs * total)
        return stats

    eventually(settled, 20)


@pytest.mark.integration
def test_kept_file_evicted_since_is_fetched_again_and_counted_once(s3, bucket, mount_dataset):
    a, b = os.urandom(100_000), os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
    s3.put_object(Bucket=bucket, Key="ds/b", Body=b)
    m = mount_dataset(bucket, "ds", "--capacity", "150000")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # miss
    assert path_a.read_bytes() == a  # cached: remembered as a file whose opens keep the page cache
    assert (m.mountpoint / "b").read_bytes() == b  # miss; evicts a (the capacity holds one file)
    eventually(lambda: m.stats().served_from_cache_bytes == len(a), 20, "the hit counted")
    # This open still takes the remembered path (keep the page cache); drop the kernel's copy
    # of a so that the bytes are asked for: they come from the source again, and count once.
    with open(path_a, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == a

    def settled():
        stats = m.stats()
        assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (2 * len(a) + len(b), len(a))
        return stats

    eventually(settled, 20)
