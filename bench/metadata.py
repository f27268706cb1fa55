"""Metadata at scale: index build, mount time, worker memory and tree walks at 10k to 1M objects.

Putting a million objects into MinIO through the slow link would take most of an hour on these
2 cores, so each cost is measured where it really arises:

1. **listing the store**: timed for real on the ImageNet prefix through the slow link (pages of
   1000 keys per round trip), and reported per 1000 objects; for larger sizes it is that
   measured page rate times the number of pages (S3 lists sequentially, one page per request);
2. **building the index from a listing**: the worker's own path, a snapshot of a synthetic
   listing of ``n`` entries (key, size, ETag, mtime, as S3 would yield them) and the index built
   from it (``cache_worker/snapshot.py``, ``build_index_from``);
3. **mounting an indexed dataset**: ``datahoard mount`` for real, over that index in the cache
   directory (the worker reuses an index whose source URI matches, as after a restart); the
   source is a real, empty MinIO prefix;
4. **memory**: the worker's RSS after mounting, after a ``readdir`` of every directory, and
   after ``stat`` of up to 20,000 files; per indexed file as the slope between sizes;
5. **walks**: ``os.walk`` of the whole view (readdir of every directory) and the ``stat`` rate.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from . import readers
from .systems import Datahoard

FILES_PER_DIR = 1000


class SyntheticSource:
    """A listing of ``n`` objects in directories of 1000, as an S3 listing would return them."""

    def __init__(self, uri: str, n: int) -> None:
        self.uri = uri
        self.n = n

    def list(self) -> Iterator:
        from datahoard.cache_worker.source import RemoteObject

        for i in range(self.n):
            d, f = divmod(i, FILES_PER_DIR)
            yield RemoteObject(key=f"train/n{d:08d}/n{d:08d}_{f:07d}.JPEG", size=110_000 + (i % 50_000),
                               etag=f"{i:032x}", mtime=1.7e9)

    def close(self) -> None:
        pass


def list_rate(client, bucket: str, prefix: str) -> dict:
    """Objects/s and seconds per page of a real listing through the slow link."""
    start = time.perf_counter()
    pages = objects = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        pages += 1
        objects += page.get("KeyCount", 0)
    seconds = time.perf_counter() - start
    return {"objects": objects, "pages": pages, "seconds": seconds,
            "seconds_per_page": seconds / max(1, pages), "objects_per_second": objects / seconds}


def measure(n: int, work: Path, endpoint: str, list_page_seconds: float, walk_cap: float) -> dict:
    from datahoard.cache_worker import snapshot
    from datahoard.cache_worker.index import build_index_from

    source_uri = f"s3://bench/meta-{n}/"
    cache_dir, mnt = work / f"meta-{n}-cache", work / f"meta-{n}-mnt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # As the worker does (index_open.open_index): listing -> snapshot file -> index; a mount reuses
    # an index only together with its snapshot file.
    sid, path, _ = snapshot.write(SyntheticSource(source_uri, n).list(), source_uri, cache_dir)
    summary = build_index_from(snapshot.read(path, sid, source_uri), source_uri, cache_dir / "index.db",
                               snapshot=sid)
    build = time.perf_counter() - start
    row = {"objects": n, "index_build_seconds": build, "index_bytes": (cache_dir / "index.db").stat().st_size,
           "listing_seconds_estimated": -(-n // 1000) * list_page_seconds}
    assert summary.files == n
    readers.drop_caches()
    view = Datahoard(source_uri, mnt, cache_dir, endpoint)
    try:
        row["mount_seconds"] = view.mount_seconds
        row["rss_after_mount"] = readers.rss(view.pid)
        start = time.perf_counter()
        dirs = files = 0
        all_files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(mnt):
            dirs += 1
            files += len(filenames)
            if len(all_files) < 200_000:
                all_files.extend(os.path.join(dirpath, f) for f in filenames[:200])
            if time.perf_counter() - start > walk_cap:
                break
        row["walk_seconds"] = time.perf_counter() - start
        row["walk_files"] = files
        row["walk_complete"] = files == n
        row["rss_after_walk"] = readers.rss(view.pid)
        sample = random.Random(n).sample(all_files, min(20_000, len(all_files)))
        start = time.perf_counter()
        for path in sample:
            os.stat(path)
        row["stat_per_second"] = len(sample) / (time.perf_counter() - start)
        row["rss_after_stat"] = readers.rss(view.pid)
        row["rss_peak"] = readers.peak_rss(view.pid)
    finally:
        view.close()
        readers.drop_caches()
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    return row
