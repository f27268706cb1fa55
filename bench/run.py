"""``make bench``: Datahoard against local disk, direct S3, rclone and s3fs, in one run.

    python -m bench.run [--quick] [--rtt-ms 10] [--rate-mbit 1000] [--out bench/]

Steps (every mount, server and namespace is torn down in ``finally`` blocks):

1. generate the data on local disk (the local-disk copy), start MinIO behind the slow link
   (bench/remote.py), upload, then apply the bandwidth cap;
2. for each system, each workload: page cache dropped, a *cold* epoch, then a *warm* epoch that
   replays exactly what the cold one read. Systems: local disk; boto3 (serial, and with the
   readers' concurrency); Datahoard (cold/warm; pre-warmed with ``--warm`` then page cache
   dropped; warming throughput); "datahoard direct" (``--warm --direct``: cold epoch through
   FUSE, then, once the worker serves its tree of hard links with no FUSE hop, the warm epoch
   and a pre-warmed one); "datahoard kernel opens" (``--no-passthrough`` on a fully cached
   small-file set); rclone ``--vfs-cache-mode full``; s3fs ``use_cache``. Every Datahoard
   workload also runs a *dropped* epoch: fully cached, page cache dropped before each try, paired
   with local-disk tries that start the same way (issue 17's targets);
3. metadata at 10k..1M objects (bench/metadata.py);
4. ``results.json`` (every figure and the named targets) and ``RESULTS.md`` (bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

from . import data, metadata, readers, report
from .remote import BUCKET, LinkSpec, RemoteStore
from .systems import Datahoard, MountError, Rclone, S3fs

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: A warm try (page cache warm, nothing left to fetch) repeats its operations until it lasts about
#: this long. Measured: in one pass, the random workload's 2,000 reads took 0.03 s and local
#: disk's own three tries in one run ranged 37,956-61,604 reads/s, so a ratio against local
#: disk could not tell 0.8 from 1.0; 0.15-0.4 s epochs (shards, small files) moved 1.5x.
WARM_TRY_SECONDS = 1.0
MAX_WARM_PASSES = 50
#: A first pass longer than this is long enough as it is: no second pass to calibrate.
CALIBRATION_MAX_SECONDS = 10.0


def warm_passes(one_pass_seconds: float) -> int:
    """How many passes over a warm epoch's operations make one try last ``WARM_TRY_SECONDS``."""
    if one_pass_seconds <= 0:
        return MAX_WARM_PASSES
    return max(1, min(MAX_WARM_PASSES, math.ceil(WARM_TRY_SECONDS / one_pass_seconds)))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = data.QUICK if args.quick else data.FULL
        self.work = Path(args.work)
        self.runs: list[dict] = []
        self.extra: dict = {"skipped": {}}
        rng = random.Random(42)
        self.imagenet = [("file", p) for p in rng.sample(data.imagenet_paths(self.scale), k=len(data.imagenet_paths(self.scale)))]
        self.shards = [[("range", p, off, MiB) for off in range(0, self.scale.shard_bytes, MiB)]
                       for p in data.shard_paths(self.scale)]
        self.random_ops = []
        for _ in range(self.scale.random_reads):
            length = int(math.exp(rng.uniform(math.log(4096), math.log(MiB))))
            self.random_ops.append(("range", data.RANDOM_PATH, rng.randrange(self.scale.random_bytes - length), length))

    # -- one epoch -------------------------------------------------------------------------
    def epoch(self, workload: str, system: str, kind: str, root: str, plan, pid: int = 0,
              s3conf: dict | None = None, strip: str = "", repeats: int = 1,
              paired: bool = False, dropped: bool = False) -> readers.EpochResult:
        """One epoch; with ``repeats`` (epochs over a fully cached system only: they leave no
        state behind) the best of that many, because other work on a shared 2-core machine slows
        short epochs a lot.

        ``paired``: before each try, the same operations are read from the local-disk copy, so
        the ratio to local disk compares epochs run under the same load: the local figure
        measured once at the start of a run moved 1.5x between runs. ``dropped``: the page cache
        is dropped before every try, local and system alike (issue 17's "page cache dropped":
        a fully cached dataset read from the cache disk, not RAM); without it both read with
        the page cache warm."""
        local_plan = plan
        if strip:
            plan = [[(op[0], op[1][len(strip):], *op[2:]) for op in ops] for ops in plan]
        tries, local_tries = [], []
        passes = 1
        if not dropped and repeats > 1:
            # An untimed pass brings the pages in (the local copy's, when paired); a second,
            # now warm, says how many passes over the operations make a try last
            # WARM_TRY_SECONDS (the first can read from disk: it follows a dropped epoch).
            where, ops = (str(self.work / "local"), local_plan) if paired else (root, plan)
            one_pass = readers.run_epoch(where, ops, self.scale.epoch_cap, s3conf).seconds
            if one_pass < CALIBRATION_MAX_SECONDS:
                one_pass = readers.run_epoch(where, ops, self.scale.epoch_cap, s3conf).seconds
            passes = warm_passes(one_pass)
            plan, local_plan = ([ops * passes for ops in p] for p in (plan, local_plan))
        for _ in range(repeats):
            if paired:
                if dropped:
                    readers.drop_caches()
                local = readers.run_epoch(str(self.work / "local"), local_plan, self.scale.epoch_cap)
                local_tries.append(local.ops / local.seconds if local.seconds else 0.0)
            if dropped:
                readers.drop_caches()
            cpu0 = readers.process_tree_cpu(pid) if pid else 0.0
            res = readers.run_epoch(root, plan, self.scale.epoch_cap, s3conf)
            daemon_cpu = (readers.process_tree_cpu(pid) - cpu0) if pid else 0.0
            tries.append((res.ops / res.seconds if res.seconds else 0.0, res, daemon_cpu))
        _, res, daemon_cpu = max(tries, key=lambda t: t[0])
        planned = sum(len(ops) for ops in plan)
        gb = res.bytes / 1e9
        row = {
            "workload": workload, "system": system, "epoch": kind,
            "ops": res.ops, "planned_ops": planned, "complete": res.ops == planned,
            "bytes": res.bytes, "seconds": round(res.seconds, 3),
            "ops_per_s": res.ops / res.seconds if res.seconds else 0.0,
            "mb_per_s": res.bytes / 1e6 / res.seconds if res.seconds else 0.0,
            "p50_ms": readers.percentile(res.latencies, 0.5) * 1000,
            "p99_ms": readers.percentile(res.latencies, 0.99) * 1000,
            "reader_cpu_s": round(res.reader_cpu, 2), "daemon_cpu_s": round(daemon_cpu, 2),
            "cpu_s_per_gb": (res.reader_cpu + daemon_cpu) / gb if gb else None,
            "readers": len(plan), "errors": res.errors[:3], "page_cache": "dropped" if dropped else "warm",
            "all_ops_per_s": [round(t[0], 1) for t in tries], "passes": passes,
        }
        if pid:
            row["daemon_peak_rss"] = readers.peak_rss(pid)
        if paired:
            row["local_alongside_ops_per_s"] = max(local_tries)
            row["local_alongside_all_ops_per_s"] = [round(t, 1) for t in local_tries]
        self.runs.append(row)
        log(f"{workload:9s} {system:18s} {kind:13s} {row['ops']:6d}/{planned} ops {row['ops_per_s']:9.1f}/s "
            f"{row['mb_per_s']:8.1f} MB/s p50 {row['p50_ms']:7.2f} ms p99 {row['p99_ms']:8.2f} ms"
            + (f" ERRORS {res.errors[:1]}" if res.errors else "")
            + (f" (local alongside {row['local_alongside_ops_per_s']:.1f}/s)" if paired else ""))
        # The plan returned is in the caller's path space, for the warm replay.
        if strip:
            return _replay(res, strip)
        return res

    def workloads(self, peers: bool = False) -> list[tuple[str, list[list]]]:
        n = self.scale.readers
        ops = self.imagenet[: self.scale.peer_files] if peers else self.imagenet
        return [("imagenet", readers.split(ops, n)), ("shards", self.shards),
                ("random", readers.split(self.random_ops, n))]

    def cold_warm(self, system: str, root: str, pid: int = 0, peers: bool = False, strip: str = "",
                  only: tuple[str, ...] = (), before_warm=None, paired: tuple[str, ...] = (),
                  dropped: tuple[str, ...] = ()) -> None:
        """Cold then warm epochs per workload; for the workloads in ``dropped``, then the same
        operations again with the page cache dropped before each try (a "dropped" epoch, paired
        with local-disk epochs that also start with the page cache dropped)."""
        for workload, plan in self.workloads(peers):
            if only and workload not in only:
                continue
            readers.drop_caches()
            cold = self.epoch(workload, system, "cold", root, plan, pid, strip=strip)
            if cold.errors and not cold.ops:
                # A system that cannot read at all retries for minutes per workload: stop here.
                self.extra["skipped"][system] = f"{workload} cold epoch failed: {cold.errors[0]}"
                return
            if before_warm is not None:
                before_warm(workload)
            self.epoch(workload, system, "warm", root, cold.done, pid, strip=strip, repeats=self.scale.warm_repeats,
                       paired=workload in paired)
            if workload in dropped:
                self.epoch(workload, system, "dropped", root, cold.done, pid, strip=strip,
                           repeats=self.scale.warm_repeats, paired=True, dropped=True)

    # -- systems ---------------------------------------------------------------------------
    def local(self) -> None:
        self.cold_warm("local disk", str(self.work / "local"))

    def boto3(self, remote: RemoteStore) -> None:
        conf = {"endpoint": remote.endpoint, "bucket": BUCKET}
        os.environ.update(remote.env())
        n = self.scale.readers
        s3 = lambda plan: [[("s3", op[1]) for op in ops] for ops in plan]  # noqa: E731
        readers.drop_caches()
        self.epoch("imagenet", "boto3 serial", "direct", "", s3([self.imagenet[: self.scale.serial_files]]),
                   s3conf=conf)
        readers.drop_caches()
        sample = self.imagenet[: self.scale.boto3_files]
        self.epoch("imagenet", f"boto3 x{n}", "direct", "", s3(readers.split(sample, n)), s3conf=conf)
        # The store's bandwidth as parallel boto3 sees it, on the objects warming fetches.
        readers.drop_caches()
        self.epoch("imagenet", "boto3 x16 (store)", "direct", "", s3(readers.split(sample, 16)), s3conf=conf)
        ranged = lambda plan: [[("s3range", op[1], op[2], op[3]) for op in ops] for ops in plan]  # noqa: E731
        readers.drop_caches()
        big = [[("s3range", p, off, 8 * MiB) for off in range(0, self.scale.shard_bytes, 8 * MiB)]
               for p in data.shard_paths(self.scale)]
        self.epoch("shards", "boto3 (8 MiB GETs)", "direct", "", big, s3conf=conf)
        readers.drop_caches()
        self.epoch("random", f"boto3 x{n}", "direct", "", ranged(readers.split(self.random_ops, n)), s3conf=conf)

    def datahoard(self, remote: RemoteStore) -> None:
        """Two mounts, as a user makes one Dataset per data set: the ImageNet-like prefix (small
        files) and the whole bucket for shards and random reads. Once the cold epoch has cached
        a file whole, its opens are answered with FUSE passthrough (the kernel reads the cache
        file); without passthrough, a fully cached small-file set switches to kernel opens, and
        the warm epoch starts when it has. Every workload then also runs a "dropped" epoch: the
        fully cached dataset read from the cache disk (issue 17's page-cache-dropped targets)."""
        os.environ.update(remote.env())
        self.extra["datahoard_stats_after_cold_warm"] = {}
        everything = ("imagenet", "shards", "random")
        for prefix, workloads in (("imagenet/", ("imagenet",)), ("", ("shards", "random"))):
            tag = prefix.strip("/") or "bucket"
            cache, mnt = self.work / f"dh-{tag}-cache", self.work / f"dh-{tag}-mnt"
            readers.drop_caches()
            # --passthrough: measured for small files too (the default, auto, uses it only for
            # datasets with files larger than one chunk; "datahoard kernel opens" is the other).
            view = Datahoard(f"s3://{BUCKET}/{prefix}", mnt, cache, remote.endpoint, extra=("--passthrough",))
            try:
                if not prefix:
                    self.extra["datahoard_mount_with_listing_s"] = view.mount_seconds
                large = {"shards": tuple(data.shard_paths(self.scale)), "random": (data.RANDOM_PATH,)}
                wait = lambda w, view=view: self._await_serving(view, f"{w}_after_cold", large.get(w, ()))  # noqa: E731
                self.cold_warm("datahoard", str(mnt), view.pid, strip=prefix, only=workloads, before_warm=wait,
                               paired=everything, dropped=everything)
                stats = view.stats()
                self.extra["datahoard_stats_after_cold_warm"][tag] = json.loads(stats.model_dump_json())
            finally:
                view.close()
                shutil.rmtree(cache, ignore_errors=True)
        self.prewarmed(remote)

    def _await_serving(self, view: Datahoard, what: str, probe: tuple[str, ...] = (), timeout: float = 120) -> None:
        """Record how the worker serves the cached dataset: passthrough, or kernel opens (a
        fully cached small-file set without passthrough: wait for the switch, and say how long
        it took); None when neither happened within ``timeout``.

        ``probe``: files (relative to the mount) that must be passed through before the next
        epoch starts: an object larger than the check limit (1 GiB) is served before its
        whole-object check and passed through only once that check, in the background, has
        matched; a reader that opens it before then is served by the worker for as long as it
        keeps the file open. Each probe is an open and close, and counts the file as a hit."""
        start = time.monotonic()
        how, waited, pending = None, None, list(probe)
        while time.monotonic() - start < timeout:
            stats = view.stats()
            if stats.kernel_opens:
                how = "kernel opens"
            elif stats.fuse.passthrough:
                while pending:
                    before = view.stats().fuse.passthrough_opens
                    os.close(os.open(os.path.join(view.root, pending[0]), os.O_RDONLY))
                    if view.stats().fuse.passthrough_opens == before:
                        break
                    pending.pop(0)
                how = None if pending else "passthrough"
            elif not what.startswith("imagenet"):
                break  # no passthrough, and kernel opens never apply to a set with large files
            if how:
                waited = round(time.monotonic() - start, 2)
                break
            time.sleep(0.5)
        self.extra.setdefault("serving_after", {})[what] = {"how": how, "after_s": waited, "probed": list(probe)}
        if how == "kernel opens":
            self.extra.setdefault("kernel_opens_after_s", {})[what] = waited
        log(f"serving ({what}): " + (f"{how} after {waited} s" if how else
                                    f"worker reads (not passed through: {pending or 'no passthrough, no kernel opens'})"))

    def prewarmed(self, remote: RemoteStore) -> None:
        cache, mnt = self.work / "dhw-cache", self.work / "dhw-mnt"
        readers.drop_caches()
        view = Datahoard(f"s3://{BUCKET}/imagenet/", mnt, cache, remote.endpoint,
                         extra=("--warm", "--parallelism", "16", "--passthrough"))
        try:
            start = time.monotonic()
            cpu0 = readers.process_tree_cpu(view.pid)
            while True:
                stats = view.stats()
                if stats.warming.state not in ("running", "idle"):
                    break
                time.sleep(0.2)
            seconds = time.monotonic() - start
            cpu = readers.process_tree_cpu(view.pid) - cpu0
            w = stats.warming
            self.extra["warming"] = {
                "state": w.state, "files": w.files_done, "bytes": w.bytes_done, "seconds": seconds,
                "mb_per_s": w.bytes_done / 1e6 / seconds, "files_per_s": w.files_done / seconds,
                "worker_reported_bytes_per_s": w.bytes_per_second, "parallelism": 16,
                "worker_cpu_s": cpu, "cpu_s_per_gb": cpu / (w.bytes_done / 1e9) if w.bytes_done else None,
            }
            log(f"warming: {w.files_done} files {w.bytes_done / 1e6:.0f} MB in {seconds:.1f} s "
                f"= {w.bytes_done / 1e6 / seconds:.1f} MB/s ({w.state})")
            self._await_serving(view, "imagenet_after_warming")
            # Arming ahead (cache_worker/arm_ahead.py) follows the "fully cached" event: wait for
            # it, and record how long it took after warming ended.
            armed_at = time.monotonic()
            while view.stats().fuse.arming_ahead and time.monotonic() - armed_at < 120:
                time.sleep(0.2)
            self.extra["warming"]["armed"] = view.stats().fuse.native_armed
            self.extra["warming"]["arming_s_after"] = round(time.monotonic() - armed_at, 1)
            log(f"armed ahead: {self.extra['warming']['armed']} files, "
                f"{self.extra['warming']['arming_s_after']} s after warming")
            plan = readers.split(self.imagenet, self.scale.readers)
            readers.drop_caches()
            first = self.epoch("imagenet", "datahoard", "pre-warmed", str(mnt), plan, view.pid, strip="imagenet/")
            self.epoch("imagenet", "datahoard", "pre-warmed 2", str(mnt), first.done, view.pid, strip="imagenet/",
                       repeats=self.scale.warm_repeats, paired=True)
            self.extra["datahoard_peak_rss_imagenet"] = readers.peak_rss(view.pid)
        finally:
            view.close()
        # Remount the same cache: the mount time of an indexed dataset of this size.
        view = Datahoard(f"s3://{BUCKET}/imagenet/", mnt, cache, remote.endpoint, extra=("--passthrough",))
        self.extra["datahoard_remount_indexed_s"] = view.mount_seconds
        view.close()
        self.kernel_opens(remote, cache, mnt)
        shutil.rmtree(cache, ignore_errors=True)
        self.direct(remote)

    def kernel_opens(self, remote: RemoteStore, cache: Path, mnt: Path) -> None:
        """``--no-passthrough`` on the same, fully cached, small-file cache: the worker hands
        opens to the kernel (counted by fanotify), the mode passthrough replaced for small files.
        Its dropped and warm epochs, each paired with local disk, against passthrough's."""
        readers.drop_caches()
        system = "datahoard kernel opens"
        try:
            view = Datahoard(f"s3://{BUCKET}/imagenet/", mnt, cache, remote.endpoint, extra=("--no-passthrough",))
        except MountError as exc:
            self.extra["skipped"][system] = str(exc)
            return
        try:
            self._await_serving(view, "imagenet_no_passthrough")
            plan = readers.split(self.imagenet, self.scale.readers)
            first = self.epoch("imagenet", system, "dropped", str(mnt), plan, view.pid, strip="imagenet/",
                               repeats=self.scale.warm_repeats, paired=True, dropped=True)
            self.epoch("imagenet", system, "warm", str(mnt), first.done, view.pid, strip="imagenet/",
                       repeats=self.scale.warm_repeats, paired=True)
        finally:
            view.close()

    def direct(self, remote: RemoteStore) -> None:
        """``datahoard mount --warm --direct``: the cold epoch goes through FUSE while warming
        fills the cache; once the worker serves its direct tree, the warm epoch replays it."""
        cache, mnt = self.work / "dhd-cache", self.work / "dhd-mnt"
        readers.drop_caches()
        view = Datahoard(f"s3://{BUCKET}/imagenet/", mnt, cache, remote.endpoint,
                         extra=("--warm", "--direct", "--parallelism", "16"))
        system = "datahoard direct"
        try:
            plan = readers.split(self.imagenet, self.scale.readers)
            cold = self.epoch("imagenet", system, "cold", str(mnt), plan, view.pid, strip="imagenet/")
            try:
                waited = view.wait_direct(timeout=600)
            except MountError as exc:
                self.extra["skipped"][system] = str(exc)
                log(f"skipping {system} warm: {exc}")
                return
            stats = view.stats()
            self.extra["direct"] = {"seconds_to_direct_after_cold": waited, "tree_files": stats.direct.files,
                                    "tree_bytes": stats.direct.bytes}
            log(f"{system}: serving the tree {waited:.1f} s after the cold epoch ({stats.direct.files} files)")
            self.epoch("imagenet", system, "warm", str(mnt), cold.done, view.pid, strip="imagenet/",
                       repeats=self.scale.warm_repeats, paired=True)
            readers.drop_caches()
            self.epoch("imagenet", system, "pre-warmed", str(mnt), plan, view.pid, strip="imagenet/")
            self.epoch("imagenet", system, "dropped", str(mnt), plan, view.pid, strip="imagenet/",
                       repeats=self.scale.warm_repeats, paired=True, dropped=True)
        finally:
            view.close()
            shutil.rmtree(cache, ignore_errors=True)

    def peer(self, cls, remote: RemoteStore) -> None:
        if shutil.which(cls.name) is None:
            self.extra["skipped"][cls.name] = f"{cls.name} is not installed (apt-get install {cls.name})"
            log(f"skipping {cls.name}: not installed")
            return
        cache, mnt = self.work / f"{cls.name}-cache", self.work / f"{cls.name}-mnt"
        readers.drop_caches()
        try:
            view = cls(mnt, cache, remote.endpoint, self.work / f"{cls.name}.log")
        except MountError as exc:
            self.extra["skipped"][cls.name] = str(exc)
            log(f"skipping {cls.name}: {exc}")
            return
        try:
            self.extra[f"{cls.name}_mount_s"] = view.mount_seconds
            self.cold_warm(cls.name, str(mnt), view.pid, peers=True)
        finally:
            view.close()
            shutil.rmtree(cache, ignore_errors=True)

    def metadata(self, remote: RemoteStore) -> None:
        listing = metadata.list_rate(remote.client(), BUCKET, "imagenet/")
        self.extra["listing"] = listing
        log(f"listing: {listing['objects']} objects in {listing['seconds']:.2f} s "
            f"({listing['seconds_per_page'] * 1000:.1f} ms/page)")
        rows = []
        for n in self.scale.metadata_sizes:
            row = metadata.measure(n, self.work, remote.endpoint, listing["seconds_per_page"],
                                   walk_cap=60 if self.args.quick else 240)
            log(f"metadata {n}: build {row['index_build_seconds']:.1f} s, mount {row['mount_seconds']:.2f} s, "
                f"RSS {row['rss_after_stat'] / 1e6:.1f} MB, walk {row['walk_files']} files in {row['walk_seconds']:.1f} s")
            rows.append(row)
        self.extra["metadata"] = rows

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> dict:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        started = time.time()
        self.extra["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
        log(f"generating data in {self.work / 'local'}")
        total = data.generate(self.work / "local", self.scale)
        link = LinkSpec(rtt_ms=self.args.rtt_ms, rate_bits=int(self.args.rate_mbit * 1e6))
        remote = RemoteStore(Path(self.args.tools_dir), self.work, link)
        remote.start()
        try:
            log(f"uploading {total / 1e9:.2f} GB to MinIO")
            t = time.monotonic()
            data.upload(self.work / "local", remote.client(direct=True, pool=32), BUCKET, self.scale)
            self.extra["upload_seconds"] = time.monotonic() - t
            remote.apply_bandwidth_cap()
            self.extra["rtt_ms"] = remote.measured_rtt_ms()
            log(f"link: {link.rate_bits / 1e6:.0f} Mbit/s, RTT p50 {self.extra['rtt_ms']}")
            self.local()
            self.boto3(remote)
            self.datahoard(remote)
            for cls in (Rclone, S3fs):
                self.peer(cls, remote)
            self.metadata(remote)
        finally:
            self.extra["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
            remote.close()
            shutil.rmtree(self.work, ignore_errors=True)
        return {
            "mode": "quick" if self.args.quick else "full",
            "command": self.args.command_line,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "duration_s": time.time() - started,
            "machine": machine(),
            "link": {"rtt_ms_added": link.rtt_ms, "rate_mbit": link.rate_bits / 1e6,
                     "server": "MinIO (single drive) in its own network namespace"},
            "scale": {k: v for k, v in self.scale.__dict__.items()},
            "data_bytes": total,
            "runs": self.runs,
            **self.extra,
        }


def _replay(res: readers.EpochResult, strip: str) -> readers.EpochResult:
    res.done = [[(op[0], strip + op[1], *op[2:]) for op in ops] for ops in res.done]
    return res


def machine() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small data set, a couple of minutes (CI smoke test)")
    p.add_argument("--rtt-ms", type=float, default=10.0, help="round trip added by the proxy (default 10)")
    p.add_argument("--rate-mbit", type=float, default=1000.0, help="link cap each way, Mbit/s; 0 = none")
    p.add_argument("--tools-dir", default=os.environ.get("TOOLS_DIR", str(Path.home() / ".cache/datahoard-tools")))
    p.add_argument("--work", default="/var/tmp/datahoard-bench", help="scratch space (deleted after)")
    p.add_argument("--out", default=str(REPO / "bench"), help="where results.json and RESULTS.md go")
    p.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = p.parse_args(argv)
    args.command_line = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        if os.geteuid() != 0:
            raise SystemExit("the benchmark needs root (network namespaces, tc, dropping the page cache)")
        results = Bench(args).run()
        results["targets"] = report.targets(results)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(report.render(results))
    log(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")
    for name, t in results["targets"].items():
        verdict = "" if t["met"] is None else "met" if t["met"] else "MISSED"
        log(f"target {name}: {t['value']} (want {t['want']}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
