"""The ceiling of a FUSE view that answers every open, measured with libfuse's own C daemon.

    python -m bench.fuse_ceiling PASSTHROUGH_HP [--files 15000] [-- passthrough_hp flags]

``PASSTHROUGH_HP`` is libfuse 3.17's ``example/passthrough_hp`` (multi-threaded C++, answers
opens with FOPEN_PASSTHROUGH unless ``--nopassthrough``), built as
``../shared/facts/fuse-performance.md`` says: Debian trixie's ``fuse3`` source package
(``apt-get source --download-only fuse3`` with a trixie ``deb-src`` line kept out of the system
lists), ``meson setup build -Dexamples=true && ninja -C build``; run it with
``LD_LIBRARY_PATH=<src>/build/lib``. It mirrors a local ImageNet-like set (60-160 KB files), and
the same readers as ``bench.hot`` (8 processes, paired tries against the local copy, best of 3,
page cache warm and dropped) read it. What it answers: how close *any* daemon that receives an
OPEN per file (and, with passthrough, no READ) can come to local disk on this machine, whatever
language it is written in. Results and what follows from them: bench/ANALYSIS.md.

passthrough_hp keeps a descriptor per looked-up inode, so ``--files`` must stay below the
daemon's RLIMIT_NOFILE hard limit (20,000 on the test machines).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import readers
from .hot import _paired_roots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuse_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("daemon", help="libfuse's example/passthrough_hp")
    p.add_argument("--files", type=int, default=15000)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--work", default="/var/tmp/datahoard-fuse-ceiling")
    p.add_argument("flags", nargs="*", help="passthrough_hp flags, after --")
    args = p.parse_args(argv)
    work = Path(args.work)
    data, mnt = work / "data", work / "mnt"
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(1)
    paths = [f"c{i // 200:03d}/f{i:05d}.JPEG" for i in range(args.files)]
    for rel in paths:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(os.urandom(rng.randint(60_000, 160_000)))
    mnt.mkdir(parents=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    daemon = subprocess.Popen(
        [args.daemon, "--foreground", *args.flags, str(data), str(mnt)],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{args.daemon} did not mount {mnt}")
            time.sleep(0.1)
        order = list(paths)
        random.Random(2).shuffle(order)
        plan = readers.split([("file", rel) for rel in order], 8)
        out = {"daemon": args.daemon, "flags": args.flags, "files": args.files,
               "load_before": open("/proc/loadavg").read().split()[:3]}
        for name, dropped in (("warm", False), ("dropped", True)):
            out[name] = _paired_roots(str(data), plan, str(mnt), plan, args.tries, daemon.pid, dropped)
        out["load_after"] = open("/proc/loadavg").read().split()[:3]
        print(out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
