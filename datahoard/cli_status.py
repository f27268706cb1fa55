"""``datahoard status``: a running mount's numbers, read from its worker's stats endpoint, as a
table or (``--json``) the raw stats document."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import runtime
from .cli_args import CliError
from .stats import WorkerStats
from .units import format_size


def stats_for(mountpoint: Path) -> WorkerStats:
    record = runtime.lookup(mountpoint)
    if record is None:
        raise CliError(f"no datahoard mount is running at {mountpoint}")
    try:
        return runtime.fetch_stats(record.stats_url)
    except OSError as exc:
        raise CliError(f"cannot read stats of {mountpoint} from {record.stats_url}: {exc}") from exc


def status(args: argparse.Namespace) -> int:
    stats = stats_for(args.mountpoint)
    if args.json:
        print(json.dumps(stats.model_dump() | {"hit_ratio": stats.hit_ratio}, indent=2))
        return 0
    w = stats.warming
    rows = [
        ("source", stats.source),
        ("mountpoint", stats.mountpoint),
        ("ready", "yes" if stats.ready else "no"),
        ("files", f"{stats.files:,}"),
        ("snapshot", stats.snapshot or "none (a worker older than snapshots)"),
        ("total", format_size(stats.total_bytes)),
        ("cached", f"{format_size(stats.cached_bytes)} ({stats.cached_fraction:.1%}) of {format_size(stats.capacity_bytes)} capacity"),
        ("served", f"{format_size(stats.served_from_cache_bytes)} from cache, {format_size(stats.served_from_source_bytes)} from source"),
        ("hit ratio", f"{stats.hit_ratio:.3f}"),
        ("warming", f"{w.state}: {w.files_done:,}/{w.files_total:,} files, {format_size(w.bytes_per_second)}/s"
                    + (f" ({w.message})" if w.message else "")),
        ("errors", f"{stats.errors}" + (f" (last: {stats.last_error})" if stats.last_error else "")),
    ]
    if stats.consumers:
        rows.append(("readers", ", ".join(
            f"{c.namespace + '/' if c.namespace else ''}{c.pod} {format_size(c.served_bytes)}"
            + (f" (hit {c.hit_ratio:.3f})" if c.hit_ratio is not None else "") for c in stats.consumers[:3])
            + (f" and {len(stats.consumers) - 3} more" if len(stats.consumers) > 3 else "")))
    if stats.kernel_opens:
        f = stats.fuse
        by = f", by {f.opens_counted_by}" if f.opens_counted_by else ""
        if f.native_counted_opens:
            by += f", {f.native_counted_opens:,} natively"
        reads = (f"; reads past the page cache answered natively: {f.native_reads:,} ({f.native_armed:,} files armed)"
                 if f.native_note is None and not f.passthrough else "")
        rows.append(("kernel opens", "yes: the dataset is cached and the kernel opens files itself "
                                     f"(still counted{by}){reads}"))
    d = stats.direct
    if d.state != "off" or stats.serving != "fuse":
        if stats.serving == "direct":
            rows.append(("serving", f"direct: {d.path} ({d.files:,} files, {format_size(d.bytes)}"
                                    + (f", {format_size(d.assembled_bytes)} assembled" if d.assembled_bytes else "")
                                    + "); reads there bypass the worker; opens counted: "
                                    + (d.opens_counted or "no")))
        else:
            rows.append(("serving", "fuse"))
        if stats.serving != "direct" or d.message:
            rows.append(("direct tree", d.state + (f": {d.message}" if d.message else "")))
    if stats.skipped_keys:
        rows.append(("skipped keys", f"{stats.skipped_keys} (not valid paths)"))
    if stats.degraded:
        rows.append(("degraded", stats.degraded))
    f = stats.fuse
    rows.append(("passthrough", f"yes: {f.passthrough_opens:,} opens read by the kernel from the cache file"
                 + (f", {f.native_opens:,} of them answered natively ({f.native_armed:,} files armed)"
                    if f.native_note is None
                    else f"; opens answered in Python: {f.native_note}")
                 if f.passthrough else f"no: {f.passthrough_note or 'not in use'}"))
    rows.append(("restarts", "hidden: a keeper holds the FUSE connection, a worker restart is a pause"
                 + (" (this worker resumed it)" if f.resumed else "") if f.handover
                 else f"seen by readers: {f.handover_note or 'no keeper holds the connection'}"))
    if stats.unverified_objects or stats.integrity_mismatches:
        rows.append(("integrity", f"{stats.unverified_objects} objects served unchecked (nothing the store "
                                  f"vouches for), {stats.integrity_mismatches} corrupt fetches dropped"
                                  + (f" (last: {stats.last_mismatch})" if stats.last_mismatch else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
