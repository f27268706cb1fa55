"""A dataset cache over the in-memory store, without root, FUSE or network: the index listed from
a :class:`FakeSource`, a real :class:`ChunkStore` in a temporary directory and a real
:class:`DatasetCache` over both; what the unit tests of the view and the serving modes stand on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.index import Index, build_index
from datahoard.cache_worker.store import ChunkStore

from .source import FakeS3, FakeSource


@dataclass
class FakeDataset:
    s3: FakeS3
    source: FakeSource
    index: Index
    store: ChunkStore
    counters: Counters
    cache: DatasetCache


@contextlib.contextmanager
def fake_dataset(tmp_path: Path, files: Mapping[str, bytes], tuning: Tuning, bucket: str = "data",
                 capacity: int = 1 << 20) -> Iterator[FakeDataset]:
    """``files`` in ``s3://<bucket>/``, listed and cached under ``tmp_path``; closed after."""
    s3 = FakeS3()
    s3.create_bucket(bucket)
    for key, data in files.items():
        s3.put(bucket, key, data)
    source = FakeSource(s3, f"s3://{bucket}/")
    build_index(source, tmp_path / "index.db")
    index = Index(tmp_path / "index.db")
    store = ChunkStore(tmp_path / "cache", capacity)
    counters = Counters()
    cache = DatasetCache(source, store, counters, tuning)
    try:
        yield FakeDataset(s3, source, index, store, counters, cache)
    finally:
        cache.close()
        store.close()
