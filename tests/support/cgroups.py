"""Pod-like cgroups for attribution tests: kubelet's two naming schemes, under a test-private
parent in the cgroup v2 hierarchy (a kubelet's own kubepods, if any, is never touched)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def cgroup2_root() -> Path | None:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid nodes."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


@contextlib.contextmanager
def pod_cgroups(uid_a: str, uid_b: str) -> Iterator[tuple[Path, Path]]:
    """Two pod cgroups: cgroupfs form for ``uid_a``, systemd form for ``uid_b``; removed after
    (their processes must have exited). Skips the test without a writable v2 hierarchy."""
    root = cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("needs a writable cgroup v2 hierarchy (root)")
    parent = root / f"datahoard-test-{uuid.uuid4().hex[:8]}"
    a = parent / "kubepods" / "besteffort" / f"pod{uid_a}"
    b = (parent / "kubepods.slice" / "kubepods-besteffort.slice"
         / f"kubepods-besteffort-pod{uid_b.replace('-', '_')}.slice")
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    try:
        yield a, b
    finally:
        for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        parent.rmdir()


def read_in(cgroup: Path, path: Path) -> bytes:
    """Read ``path`` with a process that first moves itself into ``cgroup``, as a container's are."""
    script = 'echo $$ > "$1/cgroup.procs" && exec cat "$2"'
    return subprocess.run(["sh", "-c", script, "sh", str(cgroup), str(path)], check=True,
                          capture_output=True, timeout=60).stdout


@contextlib.contextmanager
def reading_in(cgroup: Path, path: Path) -> Iterator[bytes]:
    """Like :func:`read_in`, but the reader stays alive (as a DataLoader worker does) until the
    block ends: an open the kernel handles is reported by fanotify after the fact, and a reader
    that has exited by then can no longer be looked up."""
    # The shell opens the file itself (fd 3), so the opener is the process that lives on.
    script = 'echo $$ > "$1/cgroup.procs" && exec 3<"$2" && cat <&3 && exec sleep 300 >&- 3<&-'
    proc = subprocess.Popen(["sh", "-c", script, "sh", str(cgroup), str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        data = proc.stdout.read()
        yield data
    finally:
        proc.kill()
        proc.wait(30)
