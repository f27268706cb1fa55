"""What ``ChunkStore.backing_fd`` costs (the figures in cache_worker/store.py's docstring).

    python -m bench.backing_fd [DIR]

1. per call, for a small cached object already vouched for in this process, next to a bare
   ``open`` + ``fstat`` + ``close`` of the same file (the floor);
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

from datahoard.cache_worker.store import ChunkId, ChunkStore

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


def small(root: Path, calls: int = 20000) -> dict:
    store = ChunkStore(root / "small", capacity=1 << 40)
    oid = "a" * 40
    chunk = ChunkId(oid, 0)
    store.put(chunk, os.urandom(110 * 1024))
    fd = store.backing_fd(oid, [chunk])
    assert fd is not None
    os.close(fd)
    path = store.path(oid)
    t = time.perf_counter()
    for _ in range(calls):
        os.close(store.backing_fd(oid, [chunk]))
    per_call = (time.perf_counter() - t) / calls
    t = time.perf_counter()
    for _ in range(calls):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.fstat(fd)
        os.close(fd)
    bare = (time.perf_counter() - t) / calls
    store.close()
    return {"backing_fd_us": round(per_call * 1e6, 2), "open_fstat_close_us": round(bare * 1e6, 2)}


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
