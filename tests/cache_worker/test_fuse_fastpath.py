"""The cheap warm path of the FUSE view: opens of files known to be cached (passed through, or
kept in the page cache) that skip the index and the store, without losing a counted byte."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.mounts import read_until_passed_through
from tests.support.polling import eventually


@pytest.mark.integration
def test_concurrent_warm_opens_count_every_byte(s3, bucket, mount_dataset):
    bodies = {f"d{i % 4}/f{i}": os.urandom(3000 + 997 * i) for i in range(40)}
    for name, body in bodies.items():
        s3.put_object(Bucket=bucket, Key="ds/" + name, Body=body)
    m = mount_dataset(bucket, "ds")
    total = sum(map(len, bodies.values()))

    def read(name: str) -> bool:
        return (m.mountpoint / name).read_bytes() == bodies[name]

    assert all(map(read, bodies))  # misses: every file fetched once
    eventually(lambda: m.stats().served_from_source_bytes == total, 20, "every miss counted")
    # The dataset is whole now: opens move to the kernel (counted by fanotify). An open racing
    # that switch may be counted twice, never missed (fs.serve_opens_in_kernel); the epochs
    # below start after it, so every count is exact.
    eventually(lambda: m.stats().kernel_opens, 20, "opens handed to the kernel")
    epochs = 3
    with ThreadPoolExecutor(8) as pool:  # opens of cached files from many threads at once
        for _ in range(epochs):
            assert all(pool.map(read, bodies))
            # Once the dataset is cached, opens are counted from fanotify's queue, where two
            # opens of one file by one process merge if both wait there (README: kernel opens):
            # reading the stats counts the queue, as a loader's epochs are apart in time.
            m.stats()

    def settled():
        stats = m.stats()
        assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (total, epochs * total)
        return stats

    eventually(settled, 20)


@pytest.mark.integration
def test_kept_file_evicted_since_is_fetched_again_and_counted_once(s3, bucket, mount_dataset):
    a, b = os.urandom(100_000), os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
    s3.put_object(Bucket=bucket, Key="ds/b", Body=b)
    m = mount_dataset(bucket, "ds", "--capacity", "150000")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # miss
    assert path_a.read_bytes() == a  # cached: remembered as a file whose opens keep the page cache
    assert (m.mountpoint / "b").read_bytes() == b  # miss; evicts a (the capacity holds one file)
    eventually(lambda: m.stats().served_from_cache_bytes == len(a), 20, "the hit counted")
    # This open still takes the remembered path (keep the page cache); drop the kernel's copy
    # of a so that the bytes are asked for: they come from the source again, and count once.
    with open(path_a, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == a

    def settled():
        stats = m.stats()
        assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (2 * len(a) + len(b), len(a))
        return stats

    eventually(settled, 20)


@pytest.mark.integration
@pytest.mark.parametrize("mode", [(), ("--passthrough",)], ids=["auto", "passthrough"])
def test_small_file_evicted_from_the_store_is_served_from_the_page_cache(s3, bucket, mount_dataset, mode):
    """RAM is a second tier: a small file the store evicted but the kernel still holds is read
    from the page cache, not fetched again, and counted as a hit. Without it the load test
    (test_reliability, cache smaller than the data) fell from 3,074 to 357-672 reads/s."""
    a, b = os.urandom(100_000), os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
    s3.put_object(Bucket=bucket, Key="ds/b", Body=b)
    m = mount_dataset(bucket, "ds", "--capacity", "150000", *mode)
    assert (m.mountpoint / "a").read_bytes() == a  # miss: read through the view, into the page cache
    assert (m.mountpoint / "b").read_bytes() == b  # miss; evicts a (the capacity holds one file)
    eventually(lambda: m.stats().cached_bytes == len(b), 20)
    assert (m.mountpoint / "a").read_bytes() == a  # the kernel still has a's pages

    def settled():
        stats = m.stats()
        return stats if stats.served_from_cache_bytes == len(a) else None

    stats = eventually(settled, 20)
    assert stats.fetched_bytes == len(a) + len(b), "a was fetched again though the kernel held it"
    assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (len(a) + len(b), len(a))


def _cached_bodies(cache_dir) -> set[bytes]:
    return {p.read_bytes() for p in (cache_dir / "chunks" / "data").rglob("*") if p.is_file()}


@pytest.mark.integration
def test_passed_through_open_counts_as_use_for_eviction(s3, bucket, mount_dataset):
    """The kernel reads a passed-through file without us, so its open must refresh the file's
    place in the LRU order; otherwise eviction was first in, first out for every such file."""
    a, b, c = (os.urandom(100_000) for _ in range(3))
    for key, body in {"a": a, "b": b, "c": c}.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds", "--capacity", "250000", "--passthrough")
    assert (m.mountpoint / "a").read_bytes() == a  # miss: stored first
    time.sleep(0.05)
    assert (m.mountpoint / "b").read_bytes() == b  # miss: stored second
    time.sleep(0.05)
    assert (m.mountpoint / "a").read_bytes() == a  # passed through: a is now the newest use
    assert m.stats().fuse.passthrough_opens == 1
    time.sleep(0.05)
    assert (m.mountpoint / "c").read_bytes() == c  # miss: room for it evicts the oldest use, b
    eventually(lambda: m.stats().cached_bytes == len(a) + len(c), 20)
    assert _cached_bodies(m.cache_dir) == {a, c}


def _backing_records(m, nodeid: int) -> list[str]:
    from datahoard.cache_worker.fusell.passthrough_log import read_log

    return [op for op, node, _, _, _ in read_log(m.cache_dir / "fuse-backing.log") if node == nodeid and op in "bc"]


@pytest.mark.integration
def test_a_backing_id_is_kept_across_opens_and_closed_when_the_store_evicts_its_file(s3, bucket, mount_dataset):
    """Registering the cache file with the kernel (and closing it at the last release) was most
    of a passed-through open's cost; one id now serves every open while the file is unchanged,
    and is closed when the store evicts the file, so the kernel lets go of its space."""
    a, b = os.urandom(100_000), os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
    s3.put_object(Bucket=bucket, Key="ds/b", Body=b)
    m = mount_dataset(bucket, "ds", "--capacity", "150000", "--passthrough")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # miss
    read_until_passed_through(m, path_a, a)
    for _ in range(2):
        assert path_a.read_bytes() == a  # passed through
    assert m.stats().fuse.passthrough_opens == 3
    node = os.stat(path_a).st_ino
    assert _backing_records(m, node) == ["b"], "one registration for three opens, kept open"
    assert (m.mountpoint / "b").read_bytes() == b  # evicts a
    eventually(lambda: _backing_records(m, node) == ["b", "c"], 20)


@pytest.mark.integration
def test_a_cache_file_changed_behind_a_kept_backing_id_is_not_passed_through(s3, bucket, mount_dataset):
    """A kept id still names the file as it was registered; the next open sees the change (its
    signature) and the file is checked again, so a stray writer's bytes are never read."""
    a = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
    m = mount_dataset(bucket, "ds", "--passthrough")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # miss
    assert path_a.read_bytes() == a  # passed through: the id is kept after this release
    (cached,) = [p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file()]
    with open(cached, "r+b") as f:  # a stray writer, same size
        f.seek(4096)
        f.write(os.urandom(4096))
    with open(path_a, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == a
    assert path_a.read_bytes() == a
    assert m.stats().errors == 0


@pytest.mark.integration
def test_a_file_read_through_a_full_disk_is_cached_when_read_again_with_room(s3, bucket, mount_dataset, tmp_path):
    """The page cache is kept only for files the store took: one read through a full disk must
    reach the worker on its next open, or it would not be cached once there is room."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        a = os.urandom(300_000)
        s3.put_object(Bucket=bucket, Key="ds/a", Body=a)
        m = mount_dataset(bucket, "ds", "--capacity", "1Gi", cache_dir=disk / "cache")
        filler = disk / "filler"
        result = subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, text=True)
        assert "No space left" in result.stderr, result.stderr
        assert (m.mountpoint / "a").read_bytes() == a  # read through: the disk takes nothing
        assert m.stats().cached_bytes == 0
        filler.unlink()
        time.sleep(1.2)  # past the store's retry window after a failed fill
        assert (m.mountpoint / "a").read_bytes() == a
        eventually(lambda: m.stats().cached_bytes == len(a), 20)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
