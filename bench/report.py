"""The named targets and ``RESULTS.md``, computed from the results documents only: the
benchmark's ``results.json`` and the reliability tests' ``reliability.json`` (make reliability)."""

from __future__ import annotations

import json
from pathlib import Path

RELIABILITY = Path(__file__).resolve().parent / "reliability.json"

PEERS = ("rclone", "s3fs")


def _find(results: dict, workload: str, system: str, epoch: str) -> dict | None:
    for row in results["runs"]:
        if row["workload"] == workload and row["system"] == system and row["epoch"] == epoch:
            return row
    return None


def _rate(results: dict, workload: str, system: str, epoch: str, key: str = "ops_per_s") -> float | None:
    row = _find(results, workload, system, epoch)
    return row[key] if row and not row["errors"] else None


def _best_peer(results: dict, workload: str, epoch: str, key: str = "ops_per_s") -> tuple[str, float] | None:
    found = [(p, _rate(results, workload, p, epoch, key)) for p in PEERS]
    found = [(p, r) for p, r in found if r]
    return max(found, key=lambda x: x[1]) if found else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _boto3_parallel(results: dict) -> str:
    return next((r["system"] for r in results["runs"]
                 if r["workload"] == "imagenet" and r["system"].startswith("boto3 x") and "store" not in r["system"]),
                "boto3 x8")


def targets(results: dict) -> dict:
    """Each target of issues 6 and 17 by name: value, what is wanted, met or not (None for a
    comparison with no target), and what it compares."""
    img = lambda system, epoch: _rate(results, "imagenet", system, epoch)  # noqa: E731
    dh_warm, dh_cold = img("datahoard", "warm"), img("datahoard", "cold")
    boto_par = img(_boto3_parallel(results), "direct")
    best = _best_peer(results, "imagenet", "cold")
    store = _rate(results, "imagenet", "boto3 x16 (store)", "direct", "mb_per_s")
    warming = (results.get("warming") or {}).get("mb_per_s")
    meta = results.get("metadata") or []
    out = {}

    def add(name, value, want, ok, compares):
        met = None if ok is None else bool(value is not None and ok(value))
        out[name] = {"value": value, "want": want, "met": met, "compares": compares}

    def alongside(system: str, epoch: str, workload: str = "imagenet") -> float | None:
        """This epoch / the local-disk epochs measured alongside it (alternating tries, under
        the same load, the page cache in the same state); for an unpaired epoch, the run's own
        local warm figure."""
        row = _find(results, workload, system, epoch)
        if not row or row["errors"]:
            return None
        local = row.get("local_alongside_ops_per_s") or _rate(results, workload, "local disk", "warm")
        return _ratio(row["ops_per_s"], local)

    add("warm_vs_local_direct", alongside("datahoard direct", "warm"),
        ">= 0.9", lambda v: v >= 0.9,
        "Datahoard --direct warm epoch (fully cached, served from the tree of hard links with no "
        "FUSE hop) / local disk warm measured alongside (alternating tries), ImageNet-like files/s")
    # Issue 17: fully cached, through FUSE, each against local disk alongside. Small files are
    # measured in the serving mode the default (serving.use_passthrough) picks for the regime
    # the target describes: a warm epoch is the steady state of a dataset within half the node's
    # memory, which gets kernel opens; a dropped one that of a larger dataset, read from the
    # cache disk every epoch, which gets passthrough. The bench's set fits in memory, so the
    # second is forced with --passthrough; the other mode's figure for each is listed after.
    small_modes = {"warm": ("datahoard kernel opens", "kernel opens: the default for a small-file dataset within "
                                                      "half the node's memory"),
                   "dropped": ("datahoard", "passthrough: the default for a small-file dataset larger than half "
                                            "the node's memory, forced here")}
    for name, workload, epoch, want, what in (
            ("small_warm_vs_local", "imagenet", "warm", 0.9, "ImageNet-like files/s, page cache warm"),
            ("shards_warm_vs_local", "shards", "warm", 0.9, "1.5 GiB shards read sequentially, page cache warm"),
            ("random_warm_vs_local", "random", "warm", 0.8, "random 4 KiB-1 MiB reads of a 1 GiB file, page cache warm"),
            ("small_dropped_vs_local", "imagenet", "dropped", 0.8, "ImageNet-like files/s, page cache dropped before each try"),
            ("shards_dropped_vs_local", "shards", "dropped", 0.9, "shards read sequentially, page cache dropped before each try")):
        system, mode = small_modes[epoch] if workload == "imagenet" else ("datahoard", "passthrough")
        add(name, alongside(system, epoch, workload), f">= {want}", lambda v, want=want: v >= want,
            f"Datahoard ({mode}), fully cached, {what} / local disk measured alongside (alternating tries)")
    for name, system, epoch, mode in (
            ("small_warm_passthrough_vs_local", "datahoard", "warm", "passthrough"),
            ("small_dropped_kernel_opens_vs_local", "datahoard kernel opens", "dropped",
             "kernel opens: a dataset within half the node's memory, its page cache lost (a reboot)")):
        add(name, alongside(system, epoch), "(the other mode)", None,
            f"Datahoard ({mode}), fully cached, ImageNet-like files/s, page cache {epoch} / local disk alongside")
    add("random_dropped_vs_local", alongside("datahoard", "dropped", "random"), "(no target)", None,
        "Datahoard (passthrough), fully cached, random reads, page cache dropped / local disk alongside")
    # The comparisons: is --direct still worth keeping, and passthrough against kernel opens.
    for name, a, b, epoch in (
            ("direct_vs_passthrough_small_warm", "datahoard direct", "datahoard", "warm"),
            ("direct_vs_passthrough_small_dropped", "datahoard direct", "datahoard", "dropped"),
            ("kernel_opens_vs_passthrough_small_warm", "datahoard kernel opens", "datahoard", "warm"),
            ("kernel_opens_vs_passthrough_small_dropped", "datahoard kernel opens", "datahoard", "dropped")):
        add(name, _ratio(alongside(a, epoch), alongside(b, epoch)), "(comparison)", None,
            f"({a} / local alongside) / ({b} / local alongside), ImageNet-like, {epoch} epoch; > 1: {a} faster")
    add("cold_vs_best_peer", _ratio(dh_cold, best[1] if best else None), ">= 1.5", lambda v: v >= 1.5,
        f"Datahoard cold / best cold of rclone and s3fs ({best[0] if best else 'none ran'}), files/s")
    add("cold_vs_boto3", _ratio(dh_cold, boto_par), ">= 0.8", lambda v: v >= 0.8,
        f"Datahoard cold / {_boto3_parallel(results)} (same concurrency), files/s")
    add("warming_vs_store", _ratio(warming, store), ">= 0.9", lambda v: v >= 0.9,
        "Datahoard --warm MB/s / boto3 with 16 parallel readers on the same objects")
    add("warm_vs_direct_s3", _ratio(dh_warm, boto_par), ">= 10", lambda v: v >= 10,
        f"Datahoard warm / {_boto3_parallel(results)} through the slow link, files/s")
    if len(meta) >= 2:
        lo, hi = meta[0], meta[-1]
        slope = (hi["rss_after_stat"] - lo["rss_after_stat"]) / (hi["objects"] - lo["objects"])
        add("rss_bytes_per_file", round(slope, 1), "<= 300", lambda v: v <= 300,
            f"worker RSS growth per indexed file between {lo['objects']} and {hi['objects']} objects "
            "(after mount, a readdir of every directory and 20k stats)")
        add("mount_1m_seconds", round(hi["mount_seconds"], 2), "< 5", lambda v: v < 5,
            f"`datahoard mount` of an indexed dataset of {hi['objects']} objects")
    return out


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def render(results: dict, reliability: dict | None = None) -> str:
    """RESULTS.md; the reliability section comes from ``reliability`` or the committed
    ``bench/reliability.json``, so rerunning either harness keeps the other's figures."""
    if reliability is None and RELIABILITY.exists():
        reliability = json.loads(RELIABILITY.read_text())
    m, link, sc = results["machine"], results["link"], results["scale"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{results['command']}` (mode: {results['mode']}) on {results['started']}, "
        f"{results['duration_s'] / 60:.1f} min. Do not edit: rerun the harness. Analysis of the misses: "
        "[ANALYSIS.md](ANALYSIS.md).",
        "",
        f"**Machine**: {m['cpus']} vCPU ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"kernel {m['kernel']}, Python {m['python']}. Everything (S3 server, link, readers, FUSE "
        f"daemons) shares these 2 cores. Load average before/after: {results.get('loadavg_before')} / "
        f"{results.get('loadavg_after')} (other sessions may share the machine).",
        "",
        f"**Remote**: {link['server']}, behind a veth pair capped at {link['rate_mbit']:.0f} Mbit/s each way "
        f"(`tc tbf`) and a proxy adding {link['rtt_ms_added']:.0f} ms of round trip (bench/latproxy). "
        f"Measured request RTT (HEAD bucket, p50): {results.get('rtt_ms')} ms.",
        "",
        f"**Data**: {results['data_bytes'] / 1e9:.2f} GB: ImageNet-like {sc['classes']} classes x "
        f"{sc['files_per_class']} files of 60–160 KB (mean 110 KB); {sc['shards']} shard(s) of "
        f"{sc['shard_bytes'] / 2**30:.2f} GiB read sequentially in 1 MiB reads, one reader per shard; "
        f"{sc['random_reads']} random reads of 4 KiB–1 MiB (log-uniform) into a "
        f"{sc['random_bytes'] / 2**30:.2f} GiB file. Readers: {sc['readers']} processes (DataLoader-like: "
        f"round-robin split of a shuffled list, one read at a time each). rclone and s3fs read a shuffled "
        f"sample of {sc['peer_files']} ImageNet files, boto3 {sc['boto3_files']} (serial: {sc['serial_files']}), "
        f"because their epochs would not fit the run otherwise; every epoch stops at {sc['epoch_cap']:.0f} s and the "
        "warm epoch replays exactly what the cold one read.",
        "",
        f"cold = page cache dropped and the system's own cache empty; warm = the next epoch, best of "
        f"{sc.get('warm_repeats', 1)} (every try is in results.json: `all_ops_per_s`), each try repeating the epoch's operations until it "
        "lasts about 1 s (`passes` in results.json: one pass of the random reads took 0.03 s, too short to "
        "measure); "
        "pre-warmed = after `datahoard mount --warm` finished and the files were armed ahead for the native "
        f"responder ({(results.get('warming') or {}).get('arming_s_after', '?')} s after warming ended), page "
        "cache dropped; pre-warmed 2 = "
        "the epoch after that; dropped = fully cached, the page cache dropped before each try (best of "
        f"{sc.get('warm_repeats', 1)}). Warm and dropped Datahoard epochs alternate their tries with local-disk "
        "tries over the same files in the same page-cache state, and their \"x local\" is against those "
        "(`local_alongside_ops_per_s`). CPU s/GB counts the readers plus the serving daemon (not MinIO). "
        "Datahoard mounts the ImageNet-like prefix on its own (one Dataset per data set) and the bucket "
        "for shards and random reads; opens of files whole in the cache are answered with FUSE passthrough "
        "(the kernel reads the cache file); \"datahoard kernel opens\" is `--no-passthrough` on a fully cached "
        "small-file set, where the worker hands opens to the kernel (README: kernel opens). The default picks "
        "per dataset: kernel opens for a small-file set within half the node's memory (its epochs are warm), "
        "passthrough for a larger one (its epochs read the cache disk); so the small-file warm target is "
        "judged on kernel opens and the dropped one on passthrough, and each mode's other figure is listed "
        "with them. How each mount "
        f"served once cached: {results.get('serving_after') or results.get('kernel_opens_after_s')}.",
        "",
        "## Targets",
        "",
        "| target | value | want | met | compares |",
        "|---|---|---|---|---|",
    ]
    for name, t in results["targets"].items():
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| `{name}` | {_f(t['value'], 3)} | {t['want']} | {met} | {t['compares']} |")
    for workload, unit in (("imagenet", "files/s"), ("shards", "reads/s"), ("random", "reads/s")):
        lines += ["", f"## {workload}", "",
                  f"| system | epoch | {unit} | MB/s | p50 ms | p99 ms | CPU s/GB | daemon peak RSS MB | x local | x best peer | done |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["runs"]:
            if row["workload"] != workload:
                continue
            kind = "warm" if row["epoch"] in ("warm", "pre-warmed 2") else "cold"
            local = row.get("local_alongside_ops_per_s") or _rate(results, workload, "local disk", kind)
            best = _best_peer(results, workload, kind)
            is_dh = row["system"].startswith("datahoard")
            rss = row.get("daemon_peak_rss")
            done = f"{row['ops']}/{row['planned_ops']}" + ("" if not row["errors"] else f" errors: {row['errors'][0][:60]}")
            lines.append(
                f"| {row['system']} | {row['epoch']} | {_f(row['ops_per_s'])} | {_f(row['mb_per_s'])} | "
                f"{_f(row['p50_ms'], 2)} | {_f(row['p99_ms'], 2)} | {_f(row['cpu_s_per_gb'])} | "
                f"{_f(rss / 1e6) if rss else '–'} | "
                f"{_f(_ratio(row['ops_per_s'], local), 2) if is_dh else ''} | "
                f"{_f(_ratio(row['ops_per_s'], best[1] if best else None), 2) if is_dh else ''} | {done} |")
    w = results.get("warming")
    if w:
        lines += ["", "## Warming", "",
                  f"`datahoard mount --warm --parallelism {w['parallelism']}` of the ImageNet-like prefix: "
                  f"{w['files']:,} files, {w['bytes'] / 1e6:,.0f} MB in {w['seconds']:.1f} s = "
                  f"**{w['mb_per_s']:.1f} MB/s**, {w['files_per_s']:.0f} files/s ({w['state']}); worker CPU "
                  f"{_f(w['cpu_s_per_gb'])} s/GB. The store, read by boto3 with 16 parallel readers on the "
                  f"same objects: {_f(_rate(results, 'imagenet', 'boto3 x16 (store)', 'direct', 'mb_per_s'))} MB/s."]
    mounts = [("Datahoard, listing included (whole bucket)", results.get("datahoard_mount_with_listing_s")),
              ("Datahoard, indexed ImageNet-like prefix (remount)", results.get("datahoard_remount_indexed_s")),
              ("rclone", results.get("rclone_mount_s")), ("s3fs", results.get("s3fs_mount_s"))]
    lines += ["", "## Mount time", "", "| mount | seconds |", "|---|---|"]
    lines += [f"| {name} | {_f(v, 2)} |" for name, v in mounts if v is not None]
    meta = results.get("metadata")
    if meta:
        lst = results["listing"]
        lines += ["", "## Metadata scale", "",
                  f"Real listing through the slow link: {lst['objects']:,} objects in {lst['pages']} pages, "
                  f"{lst['seconds']:.2f} s ({lst['seconds_per_page'] * 1000:.1f} ms per 1000-key page, "
                  f"{lst['objects_per_second']:,.0f} objects/s); the listing column below is that page time "
                  "times the number of pages (S3 pages are sequential). Index build: the worker's "
                  "`build_index` fed a synthetic listing of n objects in directories of 1000. Mount: "
                  "`datahoard mount` for real over that index (see bench/metadata.py).", "",
                  "| objects | listing s (est.) | index build s | index MB | mount s | RSS after mount MB | "
                  "RSS after walk + 20k stats MB | walk s (files) | stats/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in meta:
            lines.append(
                f"| {r['objects']:,} | {r['listing_seconds_estimated']:.1f} | {r['index_build_seconds']:.2f} | "
                f"{r['index_bytes'] / 1e6:.1f} | {r['mount_seconds']:.2f} | {r['rss_after_mount'] / 1e6:.1f} | "
                f"{r['rss_after_stat'] / 1e6:.1f} | {r['walk_seconds']:.1f} ({r['walk_files']:,}"
                f"{'' if r['walk_complete'] else ', stopped at the cap'}) | {r['stat_per_second']:,.0f} |")
        if len(meta) >= 2:
            lo = meta[0]
            lines += ["", "Growth from the smallest size (ratio of cost to ratio of objects; 1.0 = linear):", ""]
            for r in meta[1:]:
                k = r["objects"] / lo["objects"]
                lines.append(
                    f"- {r['objects']:,} objects ({k:.0f}x): index build {r['index_build_seconds'] / lo['index_build_seconds'] / k:.2f}, "
                    f"mount {r['mount_seconds'] / lo['mount_seconds'] / k:.3f}, "
                    f"RSS {(r['rss_after_stat'] / lo['rss_after_stat']) / k:.3f}")
    if results.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()]
    lines += ["", "Every figure is in [results.json](results.json).", ""]
    if reliability:
        lines += ["", render_reliability(reliability)]
    return "\n".join(lines)


def render_reliability(rel: dict) -> str:
    """The load and worker-restart figures measured by the reliability tests themselves."""
    lines = ["## Reliability and load", "",
             f"Generated by `{rel['command']}`: the same tests CI runs (shorter there), with the figures "
             "they record; every run also asserted no wrong byte and no error. Figures in "
             "[reliability.json](reliability.json).", ""]
    load = rel.get("load")
    if load:
        lines += [
            f"**Load** ({load['measured_at']}, {load['machine']['cpus']} vCPU): {load['reader_threads']} reader "
            f"threads in {load['reader_processes']} processes for {load['seconds']:.0f} s over {load['files']} files "
            f"({load['dataset_bytes'] / 2**20:.0f} MiB) with warming running and a {load['capacity_bytes'] / 2**20:.0f} MiB "
            "cache (constant eviction).", "",
            "| reads | reads/s | wrong reads | errors | worker peak RSS MiB | hit ratio | cached MiB |",
            "|---|---|---|---|---|---|---|",
            f"| {load['reads']:,} | {load['reads_per_s']:,.0f} | {load['wrong_reads']} | {load['errors']} | "
            f"{load['worker_peak_rss_bytes'] / 2**20:.0f} | {load['hit_ratio']:.3f} | {load['cached_bytes'] / 2**20:.1f} |",
            "",
        ]
    restart = rel.get("restart_under_reader")
    if restart and "kills" not in restart:  # figures of the remounting worker, before issue 17
        lines += ["**Worker restarted under running readers**: the figures on file were measured before "
                  "restarts were hidden; run `make reliability` again.", ""]
    elif restart:
        restarts = restart["worker_restart_s"]
        lines += [
            f"**Worker restarted under running readers** ({restart['measured_at']}: {restart['kills']} SIGKILLs, "
            f"{restart['graceful']} graceful stops (SIGTERM, as a DaemonSet roll does), {restart['files']} files). "
            "The worker runs as its pod does, the CSI node plugin's FUSE keeper holds the FUSE connection "
            "while no worker runs, and the next worker resumes it. Each reader opens, reads whole and checks "
            "one random file after another through a CSI-published volume, in a container with "
            "HostToContainer propagation (`rslave`) or none (`rprivate`); `held-descriptors` reads through "
            "descriptors it opened before the first restart. The worker was started again at once "
            f"(in {min(restarts):.1f}-{max(restarts):.1f} s; a DaemonSet adds the kubelet's restart delay). "
            "Stall = from the last read that completed before the restart to the first after it.", "",
            "| reader | reads ok | reads failed | SIGKILL stall s (median / max) | graceful stall s (median / max) |",
            "|---|---|---|---|---|",
        ]
        for who, r in restart["readers"].items():
            k, g = r.get("kill_stall_s"), r.get("graceful_stall_s")
            lines.append(f"| {who} | {r['reads_ok']:,} | {r['reads_failed']:,} | "
                         + (f"{k['median']:.2f} / {k['max']:.2f}" if k else "-") + " | "
                         + (f"{g['median']:.2f} / {g['max']:.2f}" if g else "-") + " |")
        lines += ["", "No read failed and no wrong byte was read: requests wait in the kernel while no worker "
                  "runs, and a SIGKILLed worker's unanswered requests are sent again to the next one "
                  "(FUSE_NOTIFY_RESEND). Reads of files whole in the cache go to the cache file in the kernel "
                  "(passthrough) and do not wait at all.", ""]
    return "\n".join(lines)
