"""DataLoader-like readers: N worker processes, each doing one read at a time, timed one by one.

A *plan* is one list of operations per process (like a DataLoader's per-worker index lists).
An operation is a tuple:

* ``("file", relpath)``: open, read the whole file, close (one ImageNet sample);
* ``("range", relpath, offset, length)``: ``pread`` of one piece of a file kept open by the
  process (shards read sequentially, random reads);
* ``("s3", key)`` / ``("s3range", key, offset, length)``: the same through boto3 directly.

Each process stops at the deadline; what it did is returned so that the next epoch can replay
exactly the same operations (a warm epoch must read the bytes the cold one fetched).
CPU is the readers' own during the epoch (``getrusage`` in each process, set-up excluded); the caller adds
the serving daemon's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass, field

Op = tuple


@dataclass
class EpochResult:
    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    reader_cpu: float = 0.0
    done: list[list[Op]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _worker(root: str, ops: list[Op], time_cap: float, s3conf: dict | None, ready, out: mp.Queue) -> None:
    s3 = None
    if s3conf:
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=s3conf["endpoint"], region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}))
        bucket = s3conf["bucket"]
        s3.head_bucket(Bucket=bucket)  # connect before the clock starts
    # Every process is forked and set up before the epoch's clock starts.
    ready.wait()
    setup = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + time_cap
    fds: dict[str, int] = {}
    lat: list[float] = []
    total = 0
    done: list[Op] = []
    error = ""
    try:
        for op in ops:
            if time.monotonic() >= deadline:
                break
            kind = op[0]
            t = time.perf_counter()
            if kind == "file":
                with open(os.path.join(root, op[1]), "rb", buffering=0) as f:
                    n = 0
                    while chunk := f.read(1 << 20):
                        n += len(chunk)
            elif kind == "range":
                fd = fds.get(op[1])
                if fd is None:
                    fd = fds[op[1]] = os.open(os.path.join(root, op[1]), os.O_RDONLY)
                n = len(os.pread(fd, op[3], op[2]))
            elif kind == "s3":
                n = len(s3.get_object(Bucket=bucket, Key=op[1])["Body"].read())
            elif kind == "s3range":
                rng = f"bytes={op[2]}-{op[2] + op[3] - 1}"
                n = len(s3.get_object(Bucket=bucket, Key=op[1], Range=rng)["Body"].read())
            else:
                raise ValueError(kind)
            lat.append(time.perf_counter() - t)
            total += n
            done.append(op)
    except Exception as exc:  # noqa: BLE001 - reported, the epoch is marked failed
        error = f"{type(exc).__name__}: {exc}"
    for fd in fds.values():
        os.close(fd)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - setup.ru_utime - setup.ru_stime
    out.put((lat, total, done, cpu, error))


def run_epoch(root: str, plan: list[list[Op]], time_cap: float, s3conf: dict | None = None) -> EpochResult:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    ready = ctx.Barrier(len(plan) + 1)
    procs = [ctx.Process(target=_worker, args=(root, ops, time_cap, s3conf, ready, out)) for ops in plan]
    for p in procs:
        p.start()
    ready.wait()
    start = time.monotonic()
    result = EpochResult()
    for _ in procs:
        lat, total, done, cpu, error = out.get()
        result.latencies.extend(lat)
        result.bytes += total
        result.ops += len(done)
        result.done.append(done)
        result.reader_cpu += cpu
        if error:
            result.errors.append(error)
    result.seconds = time.monotonic() - start
    for p in procs:
        p.join()
    return result


def split(ops: list[Op], nprocs: int) -> list[list[Op]]:
    """Round-robin, as a DataLoader's sampler hands indices to its workers."""
    return [ops[i::nprocs] for i in range(nprocs)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (and its reaped children), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def process_tree_cpu(pid: int) -> float:
    """CPU of ``pid`` and its live descendants (rclone/s3fs/datahoard are one process each)."""
    total = process_cpu_seconds(pid)
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        kids = []
    return total + sum(process_tree_cpu(int(k)) for k in kids)


def peak_rss(pid: int) -> int:
    """VmHWM: the largest resident set the process has had, in bytes."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
