"""The node-local cache under bad luck, for real: a cache disk another process fills, a damaged
``chunks.db``, a private mount's cache, chunks corrupted under a running worker, and keys too
long to be paths."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import datahoard

MiB = 1 << 20


def _put(s3, bucket, files):
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)


def _wait_for(predicate, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up after {limit} s waiting for {what}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 48 MiB tmpfs for the cache directory."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Another process writes ``path`` until the filesystem has no byte left."""
    result = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4k"], capture_output=True, text=True)
    assert "No space left" in result.stderr, result.stderr
    assert os.statvfs(path.parent).f_bavail == 0


@pytest.mark.integration
def test_a_cache_disk_filled_by_another_writer_reads_through_says_why_and_recovers(
        s3, bucket, mount_dataset, small_tmpfs):
    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(150_000 + i * 1000) for i in range(40)}
    files["large.bin"] = os.urandom(20 * MiB + 12345)  # three chunks: ranged reads
    _put(s3, bucket, files)
    keys = sorted(files)
    m = mount_dataset(bucket, "ds", "--capacity", "1Gi",
                      cache_dir=small_tmpfs / "cache")
    cached = keys[:10]
    for key in cached:
        assert (m.mountpoint / key).read_bytes() == files[key]

    _fill(small_tmpfs / "filler")
    # Every file, cached or not, small or large, whole or at odd offsets: the right bytes.
    for key in keys:
        assert (m.mountpoint / key).read_bytes() == files[key], key
    with open(m.mountpoint / "large.bin", "rb") as f:
        for offset in (0, 8 * MiB - 7, 17 * MiB + 3, 20 * MiB):
            f.seek(offset)
            assert f.read(100_000) == files["large.bin"][offset:offset + 100_000]
    for key in cached:  # hits still come from the cache, and their recency is not a write
        assert (m.mountpoint / key).read_bytes() == files[key], key
    stats = m.stats()
    assert stats.errors == 0, stats.last_error
    assert stats.degraded and "full" in stats.degraded, stats.degraded
    status = datahoard("status", str(m.mountpoint)).stdout
    assert "degraded" in status and "full" in status, status

    (small_tmpfs / "filler").unlink()
    # Space is back: new fills are cached again and the condition clears.
    for key in keys:
        assert (m.mountpoint / key).read_bytes() == files[key], key
    stats = _wait_for(lambda: (s := m.stats()).degraded is None and s, "degraded to clear")
    assert stats.errors == 0, stats.last_error
    assert stats.cached_bytes > 20 * MiB


# -- a private view has a private cache --------------------------------------------------------
def _as_nobody_can_read(path: Path) -> bool:
    """Whether an unprivileged user (nobody) can read ``path``."""
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                             "dd", f"if={path}", "of=/dev/null", "bs=1", "count=1"], capture_output=True, text=True)
    if result.returncode:
        assert "Permission denied" in result.stderr, result.stderr
    return result.returncode == 0


@pytest.fixture
def open_dir():
    """A directory anyone may enter (pytest's own tmp directories are 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dh-open-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.integration
@pytest.mark.parametrize("allow_other", [True, False], ids=["allow-other", "no-allow-other"])
def test_the_cache_is_as_private_as_the_view(s3, bucket, open_dir, mount_dataset, allow_other):
    files = {"a/small.bin": os.urandom(50_000), "b/large.bin": os.urandom(9 * MiB)}
    _put(s3, bucket, files)
    extra = () if allow_other else ("--no-allow-other",)
    m = mount_dataset(bucket, "ds", "--direct", "--warm", "--wait", *extra,
                      cache_dir=open_dir / "cache", mountpoint=open_dir / "mnt")
    stats = _wait_for(lambda: (s := m.stats()).direct.state in ("ready", "failed") and s, "the direct tree")
    assert stats.direct.state == "ready", stats.direct.message
    chunk = next(p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file())
    tree_file = Path(stats.direct.path) / "a" / "small.bin"
    readable = [p for p in (chunk, m.cache_dir / "index.db", m.cache_dir / "chunks" / "chunks.db", tree_file,
                            m.mountpoint / "a" / "small.bin") if _as_nobody_can_read(p)]
    if allow_other:  # a view everyone may read: so may they read its cache (and the check can tell)
        assert readable
        return
    assert readable == []
    assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700
    for dirpath, dirs, names in os.walk(m.cache_dir / "chunks"):
        for p in [Path(dirpath)] + [Path(dirpath) / n for n in names]:
            assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, p
    for dirpath, dirs, names in os.walk(m.cache_dir / "direct"):
        for p in [Path(dirpath)] + [Path(dirpath) / n for n in names]:
            assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, p
    assert (m.mountpoint / "a" / "small.bin").read_bytes() == files["a/small.bin"]  # its own user still reads
