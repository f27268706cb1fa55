"""The small-file hot path alone, in a few minutes: a fully cached ImageNet-like set read
through the view with ``--passthrough`` against local disk, page cache warm and dropped.

    python -m bench.hot [--files 4000] [--sizes 60000-160000] [--tries 3] [--extra=--no-passthrough]

The same measurement ``make bench`` makes for ``small_warm_vs_local`` and
``small_dropped_vs_local`` (paired tries: each Datahoard try follows a local-disk try over the
same files in the same page-cache state; best of ``--tries`` each side), without the shards,
peers and metadata that make a full run take 25 minutes. It also reports the worker's CPU per
file, which is what the per-open work in ``fs.py`` and ``fusell/passthrough.py`` costs. MinIO
runs with no added latency: only fully cached epochs are measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import readers
from .data import QUICK, imagenet_paths
from .remote import LinkSpec, RemoteStore
from .run import warm_passes
from .systems import Datahoard

BUCKET = "bench"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hot", description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=4000)
    p.add_argument("--sizes", default="60000-160000", help="file sizes in bytes, MIN-MAX (uniform)")
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--extra", default="--passthrough", help="mount options (space separated)")
    p.add_argument("--tools-dir", default=os.environ.get("TOOLS_DIR", str(Path.home() / ".cache/datahoard-tools")))
    p.add_argument("--work", default="/var/tmp/datahoard-bench-hot")
    args = p.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "local").mkdir(parents=True)
    rng = random.Random(1)
    classes = max(1, args.files // 200)
    paths = imagenet_paths(replace(QUICK, classes=classes, files_per_class=200))
    smallest, largest = (int(n) for n in args.sizes.split("-"))
    for rel in paths:
        path = work / "local" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rng.randint(smallest, largest)))
    remote = RemoteStore(Path(args.tools_dir), work, LinkSpec(rtt_ms=0, rate_bits=0))
    remote.start()
    view = None
    try:
        client = remote.client(direct=True, pool=32)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda rel: client.upload_file(str(work / "local" / rel), BUCKET, rel), paths))
        os.environ.update(remote.env())
        mnt, cache = work / "mnt", work / "cache"
        view = Datahoard(f"s3://{BUCKET}/imagenet/", mnt, cache, remote.endpoint,
                         extra=("--warm", "--parallelism", "16", *args.extra.split()))
        deadline = time.monotonic() + 600
        while view.stats().warming.state in ("running", "idle") and time.monotonic() < deadline:
            time.sleep(0.2)
        plan = readers.split([("file", rel[len("imagenet/"):]) for rel in paths], args.readers)
        local_plan = readers.split([("file", rel) for rel in paths], args.readers)
        # Same operation lists, two roots: the local copy keeps the "imagenet/" prefix.
        out = {"load_before": open("/proc/loadavg").read().split()[:3], "extra": args.extra, "files": len(paths),
               "sizes": args.sizes}
        # "first": the first epoch after warming (page cache dropped), once arming ahead is done
        # (cache_worker/arm_ahead.py; nothing to wait for without the native part).
        deadline = time.monotonic() + 120
        while view.stats().fuse.arming_ahead and time.monotonic() < deadline:
            time.sleep(0.2)
        out["armed_before_first"] = view.stats().fuse.native_armed
        if "--direct" in args.extra.split():  # measure the tree, not the FUSE view before it is bound
            while view.stats().serving != "direct" and time.monotonic() < deadline:
                time.sleep(0.2)
            out["direct_opens_counted"] = view.stats().direct.opens_counted
        for name, dropped, tries in (("first", True, 1), ("warm", False, args.tries), ("dropped", True, args.tries)):
            before = view.stats().fuse
            out[name] = _paired_roots(str(work / "local"), local_plan, str(mnt), plan, tries, view.pid, dropped)
            after = view.stats().fuse
            # Opens the view answered in these epochs, and the share the native part answered.
            opens = after.passthrough_opens - before.passthrough_opens
            out[name]["native_share"] = round((after.native_opens - before.native_opens) / opens, 3) if opens else None
        out["load_after"] = open("/proc/loadavg").read().split()[:3]
        stats = view.stats()
        out["passthrough_opens"] = stats.fuse.passthrough_opens
        out["kernel_opens"] = stats.kernel_opens
        out["serving"] = stats.serving
        print(out)
    finally:
        if view is not None:
            view.close()
        remote.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _paired_roots(local: str, local_plan, root: str, plan, tries: int, pid: int, dropped: bool) -> dict:
    files = sum(len(ops) for ops in plan)
    best = best_local = 0.0
    cpu_per_file = []
    passes = 1
    if not dropped:  # bring both sides' pages in first, then size tries as make bench does
        readers.run_epoch(local, local_plan, 120)
        readers.run_epoch(root, plan, 120)
        one_pass = readers.run_epoch(local, local_plan, 120).seconds
        passes = warm_passes(one_pass)
        plan, local_plan = ([ops * passes for ops in p] for p in (plan, local_plan))
        files *= passes
    for _ in range(tries):
        if dropped:
            readers.drop_caches()
        res = readers.run_epoch(local, local_plan, 120)
        best_local = max(best_local, res.ops / res.seconds)
        if dropped:
            readers.drop_caches()
        cpu0 = readers.process_tree_cpu(pid)
        res = readers.run_epoch(root, plan, 120)
        cpu_per_file.append((readers.process_tree_cpu(pid) - cpu0) / files * 1e6)
        if res.errors:
            raise SystemExit(f"errors reading the view: {res.errors[:2]}")
        best = max(best, res.ops / res.seconds)
    return {"files_per_s": round(best), "local_files_per_s": round(best_local),
            "ratio": round(best / best_local, 3), "passes": passes, "worker_cpu_us_per_file": [round(c) for c in cpu_per_file]}


if __name__ == "__main__":
    sys.exit(main())
