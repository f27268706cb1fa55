"""fanotify's two ways of reporting kernel opens (open_watch.py), on a real filesystem here; the
FUSE view's own use of them is in test_kernel_opens.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from datahoard.cache_worker.open_watch import OpenWatch

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs CAP_SYS_ADMIN (run as root)")]


@pytest.fixture
def own_fs(tmp_path):
    """A filesystem of the test's own, so that a filesystem mark sees no other process's opens."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)], check=True)
    yield tmp_path
    subprocess.run(["umount", "-l", str(tmp_path)], check=True)


def test_a_watch_whose_directories_cannot_be_marked_counts_through_descriptors(own_fs):
    """Marking by file id is refused on a kernel before 6.8 (FUSE's zero fsid); any refusal of
    the first mark must leave a working watch of the other kind, not no counts at all."""
    tmp_path = own_fs
    (tmp_path / "a").write_bytes(b"x" * 1234)
    seen: list[tuple[int, int]] = []
    watch = OpenWatch(str(tmp_path), lambda nbytes, pid: seen.append((nbytes, pid)),
                      dirs=lambda: ["no-such-directory"], sizes=lambda nodes: {})
    watch.start()
    try:
        assert watch.mode == "descriptors"
        (tmp_path / "a").read_bytes()
        watch.drain()
        assert seen == [(1234, os.getpid())]
    finally:
        watch.stop()
