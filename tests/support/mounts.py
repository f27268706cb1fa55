"""Real mounts made as a user makes them: ``datahoard mount`` and ``umount`` through the CLI,
and what the kernel's mount table says about them afterwards.

:class:`Mounts` is the one mount fixture's body (S3 in tests/conftest.py, HDFS in
tests/hdfs/conftest.py): it numbers mountpoints and cache directories under the test's
temporary directory and unmounts whatever a test leaves mounted, even when it failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.polling import eventually

#: Why FUSE mounts cannot be made here (None when they can): integration tests skip with it.
FUSE_MISSING = (
    "needs root, /dev/fuse and fusermount3"
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
    else None
)


@dataclass
class Mount:
    mountpoint: Path
    cache_dir: Path
    source: str
    endpoint: str | None = None
    #: What ``datahoard mount`` printed.
    output: str = ""

    def stats(self):
        from datahoard import runtime

        record = runtime.lookup(self.mountpoint)
        assert record is not None, f"no mount record for {self.mountpoint}"
        return runtime.fetch_stats(record.stats_url)


def read_until_passed_through(m: Mount, path: Path, body: bytes) -> int:
    """Read ``path`` (checking its bytes) until an open of it is passed through; how many reads
    that took. After a miss the next open may still get the page cache: the kernel sends the
    miss's RELEASE asynchronously, and an inode with a caching open left cannot be passed
    through (fs_data), so a test that counts passed-through opens starts counting here."""
    reads = 0
    before = m.stats().fuse.passthrough_opens

    def passed() -> bool:
        nonlocal reads
        assert path.read_bytes() == body
        reads += 1
        return m.stats().fuse.passthrough_opens > before
    eventually(passed, 20, what=f"an open of {path.name} passed through")
    return reads


def datahoard(*args: str, check: bool = True, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "datahoard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"datahoard {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def unmount(m: Mount) -> None:
    datahoard("umount", str(m.mountpoint))
    assert not os.path.ismount(m.mountpoint)


def mounts_at(path: Path) -> list[tuple[str, str]]:
    """(fstype, root) of every mount stacked at ``path``, bottom first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == str(path):
                out.append((right.split()[0], fields[3]))
    return out


@dataclass
class Mounts:
    """``datahoard mount`` at ``base/mnt<n>`` with cache ``base/cache<n>``; :meth:`cleanup`
    unmounts every one still mounted (the CLI first, then a lazy fusermount3)."""

    base: Path
    made: list[Mount] = field(default_factory=list)

    def mount(self, source: str, *extra: str, cache_dir: Path | None = None,
              mountpoint: Path | None = None, endpoint: str | None = None,
              env: dict[str, str] | None = None) -> Mount:
        n = len(self.made)
        m = Mount(mountpoint=mountpoint or self.base / f"mnt{n}",
                  cache_dir=cache_dir or self.base / f"cache{n}", source=source, endpoint=endpoint)
        # Recorded before mounting, so a mount that half-succeeded is cleaned up too.
        self.made.append(m)
        endpoint_args = ("--endpoint-url", endpoint) if endpoint else ()
        m.output = datahoard("mount", source, str(m.mountpoint), "--cache-dir", str(m.cache_dir),
                             *endpoint_args, *extra, env=env).stdout
        return m

    def cleanup(self) -> None:
        for m in self.made:
            if os.path.ismount(m.mountpoint):
                datahoard("umount", str(m.mountpoint), check=False)
            force_unmount(m.mountpoint)
