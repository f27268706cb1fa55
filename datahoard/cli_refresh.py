"""``datahoard refresh DIR``: list a running mount's source again and apply the new snapshot in
place (cache_worker/refresh.py says what readers see), waiting for it with a bounded wait."""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request

from . import runtime
from .cli_args import CliError
from .cli_status import stats_for
from .units import format_size

#: Seconds between looks at the worker's progress.
_POLL = 0.5


def refresh(args: argparse.Namespace) -> int:
    record = runtime.lookup(args.mountpoint)
    if record is None:
        raise CliError(f"no datahoard mount is running at {args.mountpoint}")
    before = stats_for(args.mountpoint).refresh.started_at
    request = urllib.request.Request(f"{record.stats_url}/refresh", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        raise CliError(f"the worker refused the refresh: {exc.read().decode(errors='replace').strip()}") from None
    except OSError as exc:
        raise CliError(f"cannot reach the worker of {args.mountpoint} at {record.stats_url}: {exc}") from exc
    deadline = time.monotonic() + args.timeout
    while True:
        state = stats_for(args.mountpoint).refresh
        if state.started_at != before and state.state in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            raise CliError(f"the refresh is still running after {args.timeout:g} s (it goes on; "
                           f"`datahoard status {args.mountpoint}` shows when it is done)")
        time.sleep(_POLL)
    if state.state == "failed":
        raise CliError(f"refresh failed, the previous snapshot is still served: {state.message}")
    print(f"snapshot {state.snapshot}: {state.added_files} files added ({format_size(state.added_bytes)}), "
          f"{state.changed_files} changed, {state.removed_files} removed")
    return 0
