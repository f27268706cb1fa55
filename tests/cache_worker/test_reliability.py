"""Crash safety, a full cache disk, and sustained concurrent load, all for real."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import pytest

from datahoard import runtime
from tests.support.mounts import force_unmount
from tests.support.results import record

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _put(s3, bucket, files):
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)


def test_sigkill_during_warming_and_eviction_leaves_no_bad_entry(s3, bucket, mount_dataset, tmp_path):
    """Kill the worker at random points while it warms and evicts; every restart reuses what
    was complete, and at the end every byte read is right."""
    files = {f"d{i % 5}/f{i:03d}.bin": os.urandom(random.randint(1, 400_000)) for i in range(80)}
    files["big.bin"] = os.urandom(20 * MiB)
    _put(s3, bucket, files)
    cache = tmp_path / "cache"
    mountpoint = tmp_path / "mnt"
    rng = random.Random(1234)
    for _ in range(6):
        # --max-restarts 0: each kill stays a crash. A supervisor restarting the worker holds
        # the mount lock while it looks for the view, and the next mount here then found the
        # mountpoint busy (seen in CI: "another datahoard mount ... is in progress").
        m = mount_dataset(bucket, "ds", "--warm", "--parallelism", "8", "--capacity", "24Mi", "--max-restarts", "0",
                          cache_dir=cache, mountpoint=mountpoint)
        time.sleep(rng.uniform(0.05, 0.8))
        os.kill(runtime.lookup(m.mountpoint).pid, 9)
        time.sleep(0.2)
        force_unmount(mountpoint)
    m = mount_dataset(bucket, "ds", "--capacity", "24Mi", cache_dir=cache, mountpoint=mountpoint)
    assert list((cache / "chunks" / "tmp").iterdir()) == []
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body, key
    stats = m.stats()
    assert stats.errors == 0 and stats.cached_bytes <= 24 * MiB


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB filesystem for the cache directory, so that writes really fail with ENOSPC."""
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_cache_disk_reads_through_with_a_clear_condition(s3, bucket, mount_dataset, tiny_disk):
    files = {f"f{i}.bin": os.urandom(700_000) for i in range(8)}
    files["z-too-big.bin"] = os.urandom(6 * MiB)  # one chunk, larger than the whole disk
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--capacity", "1Gi", cache_dir=tiny_disk / "cache")
    for key in sorted(files):
        assert (m.mountpoint / key).read_bytes() == files[key]
    stats = m.stats()
    assert stats.errors == 0
    assert stats.degraded and "cache disk is full" in stats.degraded
    assert stats.cached_bytes < 4 * MiB


_READER = r"""
import hashlib, json, random, sys, threading, time
root, keys, seconds, threads = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
digests, out, lock = json.loads(sys.argv[5]), {"reads": 0, "bad": []}, threading.Lock()
def run(seed):
    rng = random.Random(seed); end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = rng.choice(keys)
        ok = hashlib.sha256(open(root + "/" + key, "rb").read()).hexdigest() == digests[key]
        with lock:
            out["reads"] += 1
            if not ok: out["bad"].append(key)
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def test_many_concurrent_readers_with_warming_and_eviction(s3, bucket, mount_dataset):
    """64 reader threads in 4 processes, warming running and a cache too small for the data,
    for DATAHOARD_LOAD_SECONDS (20 s in CI): right bytes, no errors, bounded memory."""
    seconds = float(os.environ.get("DATAHOARD_LOAD_SECONDS", "20"))
    files = {f"c{i % 8}/f{i:03d}.bin": os.urandom(random.randint(10_000, 300_000)) for i in range(200)}
    files["shard.bin"] = os.urandom(30 * MiB)
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--capacity", "24Mi")
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _READER, str(m.mountpoint), json.dumps(list(files)), str(seconds), "16",
             json.dumps(digests)],
            stdout=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    pid = runtime.lookup(m.mountpoint).pid
    peak_rss = 0
    while any(p.poll() is None for p in procs):
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        peak_rss = max(peak_rss, rss * 1024)
        time.sleep(0.5)
    results = [json.loads(p.stdout.read()) for p in procs]
    assert all(r["bad"] == [] for r in results)
    reads = sum(r["reads"] for r in results)
    stats = m.stats()
    print(f"load: {reads} reads in {seconds:.0f} s by 64 threads; worker peak RSS {peak_rss / MiB:.0f} MiB; "
          f"hit ratio {stats.hit_ratio:.3f}; cached {stats.cached_bytes / MiB:.1f} MiB")
    assert reads > 0 and stats.errors == 0
    assert stats.cached_bytes <= 24 * MiB
    assert peak_rss < 400 * MiB
    record("load", {
        "seconds": seconds, "reader_threads": 64, "reader_processes": 4, "files": len(files),
        "dataset_bytes": sum(map(len, files.values())), "capacity_bytes": 24 * MiB,
        "reads": reads, "reads_per_s": reads / seconds, "wrong_reads": 0, "errors": stats.errors,
        "worker_peak_rss_bytes": peak_rss, "hit_ratio": stats.hit_ratio, "cached_bytes": stats.cached_bytes,
    })
