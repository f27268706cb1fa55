"""fusell (our FUSE protocol layer) against today's binding (mfusepy on libfuse 3.14) and
local disk, on the same files in one run. Numbers go into fusell/session.py's docstring.

    python bench/fusell_bench.py [--files 2000] [--big-mib 1024] [--runs 3]

Small files: stat + open + read + close of every file, a fresh mount's first epoch (every
lookup and open reaches the daemon) and the next (entries cached 1 h, data kept). Big file:
one sequential read in 1 MiB os.read calls, page cache warm and dropped (fadvise DONTNEED on
the files involved only, so the rest of the machine keeps its cache).
"""

from __future__ import annotations

import argparse
import errno
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO / "tests/cache_worker/fusell_mirror.py"


def serve_mfusepy(src: str, mnt: str) -> None:
    """A mirror on today's binding with the view's options (fuse_view.mount_options)."""
    from datahoard.cache_worker.fusebind import FUSE, FuseOSError, Operations

    class M(Operations):
        use_ns = True

        def __init__(self):
            self.fds: dict[str, int] = {}

        def init_with_config(self, conn, config):
            conn.max_read = 1 << 20  # libfuse3 insists it equals the mount option

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(src + path)
            except FileNotFoundError:
                raise FuseOSError(errno.ENOENT) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid",
                                                 "st_gid", "st_blocks")} | {
                "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
                "st_atime": st.st_atime_ns}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(src + path)]

        def open(self, path, fi):
            fi.keep_cache = 1
            return 0

        def read(self, path, size, offset, fi):
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = os.open(src + path, os.O_RDONLY)
            return os.pread(fd, size, offset)

    FUSE(M(), mnt, foreground=True, raw_fi=True, ro=True, fsname="bench", subtype="mfusepy",
         entry_timeout=3600, attr_timeout=3600, negative_timeout=3600, max_read=1 << 20,
         default_permissions=True, allow_other=True)


def wait_mount(mnt: Path, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("no mount")


def start(kind: str, src: Path, mnt: Path, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if kind == "mfusepy":
        cmd = [sys.executable, __file__, "--serve-mfusepy", str(src), str(mnt)]
    else:
        cmd = [sys.executable, str(MIRROR), str(src), "--mount", str(mnt), "--timeout", "3600",
               "--threads", os.environ.get("FUSELL_THREADS", "4")]
        if kind == "fusell":
            cmd.append("--no-passthrough")
        elif kind == "fusell-noopen":
            cmd += ["--no-passthrough", "--no-open"]
        elif kind == "fusell-python":
            cmd += ["--no-passthrough", "--no-keep-cache"]
        elif kind == "fusell-passthrough":
            table = tmp / f"table-{time.monotonic_ns()}"
            cmd += ["--table", str(table)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
    wait_mount(mnt, p)
    return p


def stop(p: subprocess.Popen, mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=False)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of the server process (all threads): stable under a loaded machine,
    where wall-clock rates swing 3x from run to run."""
    if pid is None:
        return 0.0
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total / 1e9


def open_latency(path: Path, n: int = 3000) -> float:
    """Median microseconds of one open+close (one OPEN round trip; RELEASE is async)."""
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        os.close(os.open(path, os.O_RDONLY))
        lat.append(time.perf_counter_ns() - t0)
    return statistics.median(lat) / 1000


def small_epoch(root: Path, names: list[str], pid: int | None = None) -> tuple[float, float]:
    c0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for n in names:
        path = root / n
        os.stat(path)
        fd = os.open(path, os.O_RDONLY)
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)
    rate = len(names) / (time.perf_counter() - t0)
    return rate, (cpu_seconds(pid) - c0) / len(names) * 1e6


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def big_read(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    n = 0
    while chunk := os.read(fd, 1 << 20):
        n += len(chunk)
    os.close(fd)
    return n / (time.perf_counter() - t0) / 1e6


def table_cost(n: int = 20000) -> None:
    """Microseconds per BackingTable.open+release on a live connection, log on /dev/shm."""
    sys.path.insert(0, str(MIRROR.parent))
    from fusell_mirror import Mirror

    from datahoard.cache_worker.fusell.passthrough import BackingTable
    from datahoard.cache_worker.fusell.session import Connection, Session, unmount

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
            tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src, mnt = Path(d) / "src", Path(d) / "mnt"
        src.mkdir()
        mnt.mkdir()
        (src / "f").write_bytes(b"x" * 4096)
        conn = Connection.mount(mnt, fsname="bench", subtype="fusell-test")
        session = Session(conn, Mirror(str(src)), threads=1)
        t = threading.Thread(target=session.serve, daemon=True)
        t.start()
        session.ready.wait(10)
        table = BackingTable(Path(shm) / "table", conn)
        backing = lambda: os.open(src / "f", os.O_RDONLY)  # noqa: E731

        def cycle(label: str, use_backing: bool, hold: bool) -> None:
            held = table.open(2, backing) if hold else None
            t0 = time.perf_counter()
            for _ in range(n):
                c = table.open(2, backing if use_backing else None)
                table.release(2, c.fh)
            us = (time.perf_counter() - t0) / n * 1e6
            if held:
                table.release(2, held.fh)
            print(f"table open+release, {label}: {us:.1f} us", flush=True)

        cycle("caching (no backing)", False, False)
        cycle("passthrough, id already held by another open", True, True)
        cycle("passthrough, BACKING_OPEN+CLOSE every time", True, False)
        table.close()
        unmount(mnt)
        t.join(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-mfusepy", nargs=2)
    ap.add_argument("--table-cost", action="store_true")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--size", type=int, default=110 * 1024)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--kinds", default="local,mfusepy,fusell,fusell-noopen,fusell-passthrough")
    ap.add_argument("--big-kinds", default="local,fusell-passthrough,fusell-python,mfusepy")
    ap.add_argument("--threads", default="4")
    a = ap.parse_args()
    if a.table_cost:
        table_cost()
        return
    if a.serve_mfusepy:
        serve_mfusepy(*a.serve_mfusepy)
        return
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        tmp = Path(d)
        src, mnt = tmp / "src", tmp / "mnt"
        (src / "small").mkdir(parents=True)
        mnt.mkdir()
        names = []
        blob = os.urandom(a.size)
        for i in range(a.files):
            n = f"small/f{i:05d}"
            (src / n).write_bytes(blob[i % 7:] + blob[: i % 7])
            names.append(n)
        with open(src / "big", "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(a.big_mib):
                f.write(chunk)
        results: dict[str, list] = {}
        kinds = [k for k in a.kinds.split(",") if k]
        os.environ["FUSELL_THREADS"] = a.threads
        for run in range(a.runs):
            for kind in kinds:
                if kind == "local":
                    e1, e2 = small_epoch(src, names), small_epoch(src, names)
                else:
                    p = start(kind, src, mnt, tmp)
                    try:
                        e1, e2 = small_epoch(mnt, names, p.pid), small_epoch(mnt, names, p.pid)
                        lat = open_latency(mnt / names[0])
                        results.setdefault(f"open latency us {kind}", []).append((lat,) * 4)
                        print(f"run {run} open+close {kind}: median {lat:.1f} us", flush=True)
                    finally:
                        stop(p, mnt)
                r = (e1[0], e2[0], e1[1], e2[1])
                results.setdefault(f"small {kind}", []).append(r)
                print(f"run {run} small {kind}: {r[0]:.0f} -> {r[1]:.0f} files/s, server CPU "
                      f"{r[2]:.0f} -> {r[3]:.0f} us/file", flush=True)
            for kind in [k for k in a.big_kinds.split(",") if k]:
                root = src if kind == "local" else mnt
                p = None if kind == "local" else start(kind, src, mnt, tmp)
                try:
                    drop(src / "big")
                    if kind != "local":
                        drop(mnt / "big")
                    cold = big_read(root / "big")
                    warm = big_read(root / "big")
                finally:
                    if p:
                        stop(p, mnt)
                results.setdefault(f"big {kind}", []).append((cold, warm, 0, 0))
                print(f"run {run} big {kind}: cold {cold:.0f} MB/s, warm {warm:.0f} MB/s",
                      flush=True)
        print("\nmedians (small: first, second epoch files/s, then server CPU us/file; "
              "big: cold, warm MB/s)")
        for k, v in results.items():
            cols = [statistics.median(x[i] for x in v) for i in range(4)]
            print(f"{k:28s} " + " ".join(f"{c:8.0f}" for c in cols))


if __name__ == "__main__":
    main()
