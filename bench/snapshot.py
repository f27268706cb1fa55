"""A million-object snapshot reaching a new worker: how long from "here is the id and a peer"
to an index the worker can serve (issue 15: seconds, not minutes).

Measured with the worker's own code over a real HTTP endpoint, on this machine:

1. **snapshot**: the lister's cost on top of listing: a synthetic listing of ``n`` entries
   (ImageNet-like keys in directories of 1000, MD5-like ETags, distinct mtimes) written as a snapshot
   (sorted through SQLite, hashed, gzip level 1) — ``snapshot.write``;
2. **fetch**: a joining worker downloads it from the lister's stats endpoint
   (``StatsServer``'s ``GET /snapshot/<id>``, sendfile) and verifies its hash — ``snapshot.fetch``;
3. **index**: it builds its index from the file, checking the hash again as it reads —
   ``build_index_from(snapshot.read(...))``, what ``index_open.open_index`` runs.

Fetch + index is what a node that joins later waits for before mounting; listing a million
objects from S3 instead costs about 1000 sequential pages (minutes: bench/ANALYSIS.md).

    .venv/bin/python -m bench.snapshot --objects 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .metadata import FILES_PER_DIR, SyntheticSource


class RandomETags(SyntheticSource):
    """``SyntheticSource`` with MD5-like ETags: counting ones (``0000...01``) compress 4x
    better than real ETags and would flatter the snapshot's size and fetch time."""

    def list(self):
        import hashlib

        from datahoard.cache_worker.source import RemoteObject

        for i in range(self.n):
            d, f = divmod(i, FILES_PER_DIR)
            yield RemoteObject(f"train/n{d:08d}/n{d:08d}_{f:07d}.JPEG", 110_000 + (i % 50_000),
                               hashlib.md5(i.to_bytes(8, "little")).hexdigest(), 1.7e9 + i)


def measure(n: int, work: Path) -> dict:
    from datahoard.cache_worker import snapshot
    from datahoard.cache_worker.index import build_index_from
    from datahoard.cache_worker.stats_server import StatsServer

    uri = f"s3://bench/snap-{n}/"
    lister, joiner = work / "lister", work / "joiner"
    start, cpu = time.perf_counter(), time.process_time()
    sid, path, count = snapshot.write(RandomETags(uri, n).list(), uri, lister)
    row: dict = {"objects": count, "snapshot_seconds": time.perf_counter() - start,
                 "snapshot_cpu_seconds": time.process_time() - cpu, "snapshot_bytes": path.stat().st_size}
    server = StatsServer(("127.0.0.1", 0), lambda: None, lambda: True,
                         snapshot_file=lambda i: path if i == sid else None)
    server.start()
    try:
        start = time.perf_counter()
        got = snapshot.fetch([server.url], sid, joiner)
        row["fetch_seconds"] = time.perf_counter() - start
    finally:
        server.stop()
    start, cpu = time.perf_counter(), time.process_time()
    summary = build_index_from(snapshot.read(got, sid, uri), uri, joiner / "index.db", snapshot=sid)
    row["index_seconds"] = time.perf_counter() - start
    row["index_cpu_seconds"] = time.process_time() - cpu
    assert summary.files == n
    row["index_bytes"] = (joiner / "index.db").stat().st_size
    row["joiner_total_seconds"] = row["fetch_seconds"] + row["index_seconds"]
    row["load_average"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(args.objects, args.work), indent=2))
    else:
        with tempfile.TemporaryDirectory(prefix="snap-bench-") as work:
            print(json.dumps(measure(args.objects, Path(work)), indent=2))


if __name__ == "__main__":
    main()
