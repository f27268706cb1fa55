"""What ``datahoard mount`` shows while a mount starts and warms: a spinner with the objects
listed so far, the warming progress bar (``--warm --wait``) and, with ``--direct``, whether the
direct tree ended up served. On a terminal only; plain lines otherwise.
"""

from __future__ import annotations

import sys
import time

from . import runtime
from .cli_args import CliError
from .units import format_size


class ListingProgress:
    """A spinner with the number of objects listed so far, on a terminal only."""

    def __init__(self) -> None:
        self._status = None
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True).status("listing the source...")
            self._status.start()

    def update(self, n: int) -> None:
        if self._status:
            self._status.update(f"listing the source: {n:,} objects")

    def close(self) -> None:
        if self._status:
            self._status.stop()
            self._status = None


def wait_for_direct(stats_url: str, timeout: float = 3600) -> None:
    """With --warm --wait --direct: return once the tree is served, or say why it is not."""
    deadline = time.monotonic() + timeout
    while True:
        stats = runtime.fetch_stats(stats_url)
        d = stats.direct
        if d.state in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if stats.serving == "direct":
        print(f"serving from the direct tree {d.path} (no FUSE hop)")
    else:
        print(f"serving through FUSE; direct tree {d.state}" + (f": {d.message}" if d.message else ""))


def wait_for_warming(stats_url: str) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        transient=False, disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("warming", total=None)
        while True:
            stats = runtime.fetch_stats(stats_url)
            w = stats.warming
            bar.update(task, total=w.bytes_total, completed=w.bytes_done)
            if w.state not in ("running", "idle"):
                break
            time.sleep(0.5)
    if w.state == "failed":
        raise CliError(f"warming failed: {w.message or stats.last_error or w.state}")
    print(f"warmed {w.files_done} of {w.files_total} files ({format_size(stats.cached_bytes)} cached)")
    wait_for_arming(stats_url)


def wait_for_arming(stats_url: str, timeout: float = 600) -> None:
    """After warming: wait while the worker arms every file for its native responder (about
    120 us a file, arm_ahead.py), so the first epoch's opens are all answered without Python.
    Bounded: past ``timeout`` the mount is used as it is (unarmed opens go to Python)."""
    deadline = time.monotonic() + timeout
    stats = runtime.fetch_stats(stats_url)
    while stats.fuse.arming_ahead and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = runtime.fetch_stats(stats_url)
    if stats.fuse.arming_ahead:
        print(f"still arming files for the native responder after {timeout:g} s ({stats.fuse.native_armed:,} so far); "
              "opens not armed yet are answered in Python")
    elif stats.fuse.native_armed:  # also when arming ended before warming was seen to end
        print(f"armed {stats.fuse.native_armed:,} files for the native responder")
