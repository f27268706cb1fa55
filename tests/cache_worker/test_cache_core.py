"""The cache core without root, FUSE or network: DatasetCache and ChunkStore over a temporary
directory, reading from the in-memory store (tests/support/fakes/source.py, whose contract
with S3Source is checked in test_source_contract.py).

What is pinned here: hits do not reach the store; no byte is served or kept before it matched
what the store vouches for (the MD5 ETag in-band, the multipart ETag through ``evidence``, a
large object checked whole); a changed object is refused; LRU eviction keeps the cache within
its capacity; a cached file changed on disk is caught and fetched again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache, ReadState
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.source import (ChecksumMismatch, RemoteObject, SourceChanged,
                                           SourceTransientError, SourceUnreachable)
from datahoard.cache_worker.store import ChunkStore, object_id
from tests.support.fakes.source import FakeS3, FakeSource

CHUNK = 4096
BUCKET = "data"


@dataclass
class Rig:
    s3: FakeS3
    source: FakeSource
    store: ChunkStore
    counters: Counters
    cache: DatasetCache

    def put(self, key: str, data: bytes, part_size: int | None = None) -> RemoteObject:
        self.s3.put(BUCKET, key, data, part_size)
        return self.source.stat(key)

    def read(self, obj: RemoteObject, offset: int = 0, size: int | None = None) -> bytes:
        return self.cache.read(ReadState(obj), offset, obj.size if size is None else size)

    def cached(self, obj: RemoteObject) -> bool:
        return self.cache.is_cached(obj)


def blob(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ at every offset from another seed's."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator:
    made: list[Rig] = []

    def make(capacity: int = 1 << 20, **tuning) -> Rig:
        s3 = FakeS3()
        s3.create_bucket(BUCKET)
        source = FakeSource(s3, f"s3://{BUCKET}/", max_attempts=3)
        store = ChunkStore(tmp_path / f"cache{len(made)}", capacity)
        counters = Counters()
        cache = DatasetCache(source, store, counters,
                             Tuning(whole_file_max=CHUNK, chunk_size=CHUNK, **tuning))
        made.append(rig := Rig(s3, source, store, counters, cache))
        return rig

    yield make
    for rig in made:
        rig.cache.close()
        rig.store.close()


def test_a_miss_fetches_once_and_the_next_read_is_a_hit(make_rig):
    rig = make_rig()
    data = blob(3000)
    obj = rig.put("a.bin", data)
    assert rig.read(obj) == data
    assert rig.read(obj, 100, 50) == data[100:150]
    assert len(rig.s3.gets("a.bin")) == 1
    assert (rig.counters.served_from_source, rig.counters.served_from_cache) == (3000, 50)
    assert (rig.counters.misses, rig.counters.hits) == (1, 1)


def test_bytes_corrupted_in_transit_are_refetched_not_served(make_rig):
    rig = make_rig()
    data = blob(2000)
    obj = rig.put("a.bin", data)
    rig.s3.corrupt_next(BUCKET, "a.bin")
    assert rig.read(obj) == data
    assert len(rig.s3.gets("a.bin")) == 2
    assert rig.counters.integrity_mismatches == 1


def test_persistent_corruption_fails_the_read_and_keeps_nothing(make_rig):
    rig = make_rig()
    obj = rig.put("a.bin", blob(2000))
    rig.s3.corrupt_next(BUCKET, "a.bin", times=100)
    with pytest.raises(ChecksumMismatch, match="checksum mismatch reading s3://data/a.bin"):
        rig.read(obj)
    assert not rig.cached(obj)
    assert rig.store.used_bytes == 0


def test_an_object_without_an_md5_etag_is_checked_against_its_multipart_etag(make_rig):
    rig = make_rig()
    data = blob(3000, seed=1)
    obj = rig.put("parts.bin", data, part_size=1024)
    assert obj.etag.endswith("-3")
    rig.s3.corrupt_next(BUCKET, "parts.bin")
    assert rig.read(obj) == data
    assert rig.counters.integrity_mismatches == 1
    assert rig.read(obj) == data and len(rig.s3.gets("parts.bin")) == 2


def test_a_multipart_object_that_never_matches_is_an_error_not_data(make_rig):
    rig = make_rig()
    obj = rig.put("parts.bin", blob(3000, seed=2), part_size=1024)
    rig.s3.corrupt_next(BUCKET, "parts.bin", times=100)
    with pytest.raises(SourceTransientError, match="3 whole fetches did not match"):
        rig.read(obj)
    assert not rig.cached(obj) and rig.store.used_bytes == 0
    assert rig.counters.integrity_mismatches == 3


def test_a_large_object_is_checked_whole_before_any_range_is_served(make_rig):
    rig = make_rig()
    data = blob(5 * CHUNK + 123, seed=3)
    obj = rig.put("large.bin", data)
    rig.s3.corrupt_next(BUCKET, "large.bin")  # one of the chunk GETs arrives damaged
    assert rig.read(obj, 2 * CHUNK + 10, 100) == data[2 * CHUNK + 10 : 2 * CHUNK + 110]
    # Every chunk was fetched to check the object, twice (the first assembly did not match).
    assert len(rig.s3.gets("large.bin")) == 2 * 6
    assert rig.counters.integrity_mismatches == 1
    assert rig.cached(obj)
    assert rig.read(obj) == data
    assert len(rig.s3.gets("large.bin")) == 12


def test_an_object_replaced_after_listing_is_refused_and_not_cached(make_rig):
    rig = make_rig()
    obj = rig.put("a.bin", b"version one")
    rig.s3.put(BUCKET, "a.bin", b"version two")
    with pytest.raises(SourceChanged, match="changed since it was listed"):
        rig.read(obj)
    assert not rig.cached(obj)


def test_transient_failures_are_retried_by_the_source(make_rig):
    rig = make_rig()
    data = blob(1000, seed=4)
    obj = rig.put("a.bin", data)
    rig.s3.fail_next(BUCKET, "a.bin", times=2)
    assert rig.read(obj) == data
    rig2 = make_rig()
    obj2 = rig2.put("b.bin", data)
    rig2.s3.fail_next(BUCKET, "b.bin", times=3, kind="unreachable")
    with pytest.raises(SourceUnreachable, match="cannot reach S3 endpoint"):
        rig2.read(obj2)
    assert not rig2.cached(obj2)


def test_eviction_keeps_the_cache_within_capacity_least_recently_used_first(make_rig):
    rig = make_rig(capacity=3500)
    objs = [rig.put(f"f{i}", blob(1000, seed=10 + i)) for i in range(3)]
    for obj in objs:
        rig.read(obj)
    rig.read(objs[0])  # f0 is now the most recently used; f1 the least
    late = rig.put("f3", blob(1000, seed=13))
    rig.read(late)
    assert rig.store.used_bytes <= 3500
    assert rig.cached(objs[0]) and rig.cached(late)
    assert not rig.cached(objs[1])
    assert rig.read(objs[1]) == blob(1000, seed=11)  # fetched again, not lost
    assert len(rig.s3.gets("f1")) == 2 and len(rig.s3.gets("f0")) == 1


def test_a_cached_file_changed_on_disk_is_caught_and_fetched_again(make_rig):
    rig = make_rig()
    data = blob(2000, seed=5)
    obj = rig.put("a.bin", data)
    assert rig.read(obj) == data
    path = rig.store.path(object_id(obj.key, obj.etag, obj.size))
    with open(path, "r+b") as f:  # a stray writer
        f.seek(700)
        f.write(b"\0")
    assert os.path.getsize(path) == 2000
    assert rig.read(obj) == data
    assert len(rig.s3.gets("a.bin")) == 2


def test_a_cache_cut_with_another_chunk_size_never_serves_a_chunk_at_the_wrong_offset(tmp_path):
    """A chunk's record says where it sits in its object's file. A cache written with one chunk
    size and read with another (an upgrade that changes the tuning) names chunk ``n`` for two
    different ranges: served by name it would give the bytes of the old range."""
    s3 = FakeS3()
    s3.create_bucket(BUCKET)
    data = blob(8 * CHUNK, seed=9)
    s3.put(BUCKET, "large.bin", data)
    caches = []
    for chunk_size in (CHUNK, 2 * CHUNK):
        source = FakeSource(s3, f"s3://{BUCKET}/", max_attempts=3)
        store = ChunkStore(tmp_path / "cache", 1 << 20)
        cache = DatasetCache(source, store, Counters(), Tuning(whole_file_max=CHUNK, chunk_size=chunk_size))
        caches.append((cache, store))
        obj = source.stat("large.bin")
        for offset in (0, CHUNK, 3 * CHUNK, 5 * CHUNK + 7):
            assert cache.read(ReadState(obj), offset, CHUNK) == data[offset:offset + CHUNK], (chunk_size, offset)
        cache.close()
        store.close()
