"""The hit ratio is exact for a scripted read sequence, including reads the kernel page cache
answers without asking the worker (second reads of small cached files)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def test_hit_ratio_for_a_scripted_sequence(s3, bucket, mount_dataset):
    a, b, c = os.urandom(100_000), os.urandom(200_000), os.urandom(20 << 20)
    for key, body in {"a": a, "b": b, "c": c}.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds")

    def read(name: str) -> bytes:
        return (m.mountpoint / name).read_bytes()

    assert read("a") == a  # miss
    first = m.stats()
    assert (first.served_from_source_bytes, first.served_from_cache_bytes, first.hit_ratio) == (len(a), 0, 0.0)
    assert read("a") == a  # hit (the kernel keeps the page cache of a cached small file)
    assert read("b") == b  # miss
    assert read("c") == c  # miss: every chunk is fetched for this reader, read-ahead included
    assert read("c") == c  # hit, counted by the worker
    assert read("a") == a  # hit
    stats = m.stats()
    from_source = len(a) + len(b) + len(c)
    from_cache = 2 * len(a) + len(c)
    assert stats.served_from_source_bytes == from_source
    assert stats.served_from_cache_bytes == from_cache
    assert stats.hit_ratio == from_cache / (from_cache + from_source)
