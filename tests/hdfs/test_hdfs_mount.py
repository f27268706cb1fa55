"""``datahoard mount hdfs://...`` end to end: real HDFS (WebHDFS), a real FUSE mount, the real CLI."""

from __future__ import annotations

import errno
import os
import random

import pytest

from tests.support.mounts import datahoard

from .data import MANY_SUB, MANY_TOP, OTHER

pytestmark = pytest.mark.integration


def read_all(root, files):
    return {key: open(os.path.join(root, key), "rb").read() for key in files}


@pytest.fixture
def as_user(hdfs_cluster):
    def env(user: str | None = None) -> dict[str, str]:
        return {"DATAHOARD_HDFS_USER": user or hdfs_cluster.superuser,
                "DATAHOARD_HDFS_MAX_ATTEMPTS": "2"}
    return env


def test_every_file_reads_byte_for_byte(hdfs_cluster, dataset, mount_hdfs, as_user):
    files = dataset["ds"]
    m = mount_hdfs(hdfs_cluster.uri("/ds/"), env=as_user())
    assert sorted(os.listdir(m.mountpoint)) == ["class0", "class1", "deep", "empty.txt", "shard.bin"]
    assert os.stat(m.mountpoint / "shard.bin").st_size == len(files["shard.bin"])
    assert read_all(m.mountpoint, files) == files
    assert read_all(m.mountpoint, files) == files  # again, from the cache
    stats = m.stats()
    assert stats.files == len(files) and stats.total_bytes == sum(map(len, files.values()))
    assert stats.cached_bytes == stats.total_bytes
    assert stats.served_from_cache_bytes > 0 and stats.errors == 0


def test_large_file_read_by_ranges(hdfs_cluster, dataset, mount_hdfs, as_user):
    data = dataset["ds"]["shard.bin"]
    m = mount_hdfs(hdfs_cluster.uri("/ds"), "--include", "shard.bin", env=as_user())
    rng = random.Random(7)
    fd = os.open(m.mountpoint / "shard.bin", os.O_RDONLY)
    try:
        for _ in range(12):
            start = rng.randrange(len(data))
            length = rng.randrange(1, 3 << 20)
            assert os.pread(fd, length, start) == data[start:start + length], (start, length)
        assert os.pread(fd, 4096, len(data) - 10) == data[-10:]
    finally:
        os.close(fd)
    stats = m.stats()
    # Only the chunks the reads touched came from HDFS, not the whole 20 MiB.
    assert 0 < stats.fetched_bytes <= len(data) and stats.errors == 0


def test_directory_listed_in_many_batches(hdfs_cluster, dataset, mount_hdfs, as_user):
    m = mount_hdfs(hdfs_cluster.uri("/many"), env=as_user())
    names = os.listdir(m.mountpoint)
    assert len(names) == MANY_TOP + 1 and "sub" in names
    assert len(os.listdir(m.mountpoint / "sub")) == MANY_SUB
    assert m.stats().files == len(dataset["many"])
    sample = {k: v for i, (k, v) in enumerate(sorted(dataset["many"].items())) if i % 10 == 0}
    assert read_all(m.mountpoint, sample) == sample


def test_warm_fetches_everything(hdfs_cluster, dataset, mount_hdfs, as_user):
    m = mount_hdfs(hdfs_cluster.uri("/many/sub"), "--warm", "--wait", env=as_user())
    stats = m.stats()
    assert stats.cached_bytes == stats.total_bytes > 0 and stats.errors == 0


@pytest.mark.parametrize(
    ("path", "user", "message"),
    [
        ("/no/such/dir", None, "not found: hdfs://{http}/no/such/dir"),
        ("/closed", OTHER, "permission denied on hdfs://{http}/closed"),
    ],
)
def test_mount_errors_are_one_clear_line(hdfs_cluster, dataset, tmp_path, as_user, path, user, message):
    result = datahoard("mount", hdfs_cluster.uri(path), str(tmp_path / "mnt"),
                       "--cache-dir", str(tmp_path / "c"), env=as_user(user), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    expected = message.format(http=hdfs_cluster.http)
    assert len(lines) == 1 and lines[0].startswith("datahoard: error: ") and expected in lines[0], result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_unreadable_file_is_eio_and_names_the_cause(hdfs_cluster, dataset, mount_hdfs, as_user):
    m = mount_hdfs(hdfs_cluster.uri("/shared"), env=as_user(OTHER))
    assert (m.mountpoint / "readme.txt").read_bytes() == b"for everyone"
    with pytest.raises(OSError) as info:
        (m.mountpoint / "secret.bin").read_bytes()
    assert info.value.errno == errno.EIO
    stats = m.stats()
    assert stats.errors >= 1 and "permission denied on" in stats.last_error
    assert "/shared/secret.bin" in stats.last_error


def test_unreachable_namenode_is_one_clear_line(tmp_path):
    from tests.support.ports import free_port

    port = free_port()
    result = datahoard("mount", f"hdfs://127.0.0.1:{port}/x", str(tmp_path / "mnt"),
                       "--cache-dir", str(tmp_path / "c"),
                       env={"DATAHOARD_HDFS_MAX_ATTEMPTS": "2"}, check=False)
    assert result.returncode == 1
    assert f"cannot reach NameNode http://127.0.0.1:{port}" in result.stderr
