"""What ``ChunkStore.backing_fd`` costs (the figures in cache_worker/store_backing.py's docstring).

    python -m bench.backing_fd [DIR]

1. per call, for a small cached object already vouched for in this process, from the store and
   through ``DatasetCache.backing_fd`` (as the view calls it), next to a bare ``open`` +
   ``fstat`` + ``close`` of the same file (the floor);
2. the first call for a 1 GiB object (128 chunks of 8 MiB) in a new process, with the
   whole-object verification recorded in ``chunks.db`` and without it (every chunk's CRC is
   checked; page cache warm, so this is CPU, not disk).

Each "new process" is a fresh ``python -c`` so nothing of the first store's memory helps.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from types import SimpleNamespace

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.source import RemoteObject
from datahoard.cache_worker.store import ChunkId, ChunkStore, object_id

MiB = 1 << 20
CSIZE = 8 * MiB
BIG = 1 << 30

_FIRST = """
import json, sys, time
from pathlib import Path
from datahoard.cache_worker.store import ChunkId, ChunkStore
root, oid, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = ChunkStore(root, capacity=1 << 40)
chunks = [ChunkId(oid, i, i * %d, %d) for i in range(n)]
t = time.perf_counter()
fd = store.backing_fd(oid, chunks)
print(json.dumps({"seconds": time.perf_counter() - t, "ok": fd is not None}))
""" % (CSIZE, BIG)


def _per_call(fn, rounds: int = 30, calls: int = 1000) -> tuple[float, float]:
    """(best, median) microseconds per call over ``rounds`` rounds: on a loaded machine the
    best round says what the code costs, the median what a caller sees."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    times.sort()
    return round(times[0], 2), round(times[len(times) // 2], 2)


def small(root: Path) -> dict:
    store = ChunkStore(root / "small", capacity=1 << 40)
    oid = "a" * 40
    chunk = ChunkId(oid, 0)
    store.put(chunk, os.urandom(110 * 1024))
    fd = store.backing_fd(oid, [chunk])
    assert fd is not None
    os.close(fd)
    path = store.path(oid)
    direct = _per_call(lambda: os.close(store.backing_fd(oid, [chunk])))
    # Through DatasetCache, as the view calls it (object id from key, ETag and size; the
    # source is never asked: the object is cached and vouched for).
    obj = RemoteObject(key="train/c1/img001.jpg", size=110 * 1024, etag='"0123456789abcdef"', mtime=0.0)
    cache = DatasetCache(SimpleNamespace(on_mismatch=None), store, Counters(), Tuning())
    store.put(ChunkId(object_id(obj.key, obj.etag, obj.size), 0), os.urandom(obj.size))
    os.close(cache.backing_fd(obj))
    via_cache = _per_call(lambda: os.close(cache.backing_fd(obj)))
    cache.close()

    def bare() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.fstat(fd)
        os.close(fd)

    floor = _per_call(bare)
    store.close()
    return {"backing_fd_us_best_median": direct, "dataset_backing_fd_us_best_median": via_cache,
            "open_fstat_close_us_best_median": floor}


def big(root: Path) -> dict:
    store = ChunkStore(root / "big", capacity=1 << 40)
    oid = "b" * 40
    n = BIG // CSIZE
    piece = os.urandom(CSIZE)
    for i in range(n):
        store.put(ChunkId(oid, i, i * CSIZE, BIG), piece)
    store.close()

    def first() -> dict:
        out = subprocess.run([sys.executable, "-c", _FIRST, str(root / "big"), oid, str(n)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    without = first()  # nothing recorded yet: it checks every chunk, then records
    with_record = first()
    with sqlite3.connect(root / "big" / "chunks.db") as db:  # forget it, measure again
        db.execute("UPDATE objects SET verified = NULL")
    without_again = first()
    return {"first_without_record_s": [round(without["seconds"], 3), round(without_again["seconds"], 3)],
            "first_with_record_ms": round(with_record["seconds"] * 1e3, 2),
            "ok": without["ok"] and with_record["ok"] and without_again["ok"]}


def main() -> None:
    parent = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        root = Path(tmp)
        result = {"load": os.getloadavg()[0], **small(root), **big(root)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
