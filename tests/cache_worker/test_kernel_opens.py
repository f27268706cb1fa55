"""Without passthrough (the default for a dataset whose every file fits in one chunk, and
``--no-passthrough``), once warming has cached a dataset of small files, the kernel opens files itself: a warm epoch needs no trip to the worker
at all (proved by stopping the worker while reading), and fanotify keeps the counts exactly what
they are when the worker answers opens. With passthrough, opens stay in the worker (answering
one with ENOSYS would give passthrough up for the whole mount)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datahoard import runtime
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

# Unbuffered, as cat or a C loader reads: Python's buffered open() also asks isatty(), an
# ioctl that FUSE always forwards to the daemon (libfuse answers it in C, without the worker's
# Python, but a stopped worker answers nothing).
_READ_ALL = """
import hashlib, sys
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        print(hashlib.sha256(f.readall()).hexdigest())
"""


def _digests(paths: list[Path], timeout: float = 30) -> list[str]:
    """Read every file in a child process, so a read that hangs fails the test instead."""
    result = subprocess.run([sys.executable, "-c", _READ_ALL, *map(str, paths)],
                            capture_output=True, text=True, timeout=timeout, check=True)
    return result.stdout.split()


def _dataset(s3, bucket: str, sizes: list[int]) -> dict[str, bytes]:
    files = {f"class{i % 3}/img{i:03d}.jpg": os.urandom(size) for i, size in enumerate(sizes)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    return files


@pytest.mark.parametrize("counted_by", ["file ids", "descriptors"])
def test_a_cached_dataset_is_read_with_the_worker_stopped_and_every_open_counted(
        s3, bucket, mount_dataset, tmp_path, monkeypatch, counted_by):
    """Both ways fanotify reports opens count the same: by file id (the default) and through
    descriptors (past MAX_DIR_MARKS directories, or a kernel before 6.8)."""
    if counted_by == "descriptors":
        monkeypatch.setenv("DATAHOARD_OPEN_WATCH", "descriptors")
    files = _dataset(s3, bucket, [20_000 + 3_001 * i for i in range(30)])
    total = sum(map(len, files.values()))
    want = [hashlib.sha256(body).hexdigest() for body in files.values()]
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-passthrough")
    eventually(lambda: m.stats().kernel_opens, 20, "the view to hand opens to the kernel")
    assert m.stats().fuse.opens_counted_by == counted_by
    eventually(lambda: m.stats().fuse.native_armed == len(files), 30, "every file armed for the native part")
    paths = [m.mountpoint / key for key in files]

    assert _digests(paths) == want  # first epoch: the kernel asks the worker for the bytes
    first = m.stats()
    assert (first.served_from_cache_bytes, first.served_from_source_bytes) == (total, 0)

    pid = runtime.lookup(m.mountpoint).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        assert _digests(paths, timeout=20) == want  # second epoch with the worker frozen
    finally:
        os.kill(pid, signal.SIGCONT)
    second = m.stats()
    assert (second.served_from_cache_bytes, second.served_from_source_bytes) == (2 * total, 0)
    assert second.fetched_bytes == total  # warming fetched everything once, nothing since
    # By file id, the native part counts the opens of armed files, with no Python per open.
    natively = second.fuse.native_counted_opens - first.fuse.native_counted_opens
    assert natively == (len(files) if counted_by == "file ids" else 0)

    # Opens through another mount of the same view (as the CSI plugin binds it into pods) count too.
    bind = tmp_path / "pod-volume"
    bind.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(m.mountpoint), str(bind)], check=True)
    try:
        assert _digests([bind / key for key in files]) == want
    finally:
        subprocess.run(["umount", "-l", str(bind)], check=True)  # lazily, as the CSI plugin does
    third = m.stats()
    assert (third.served_from_cache_bytes, third.served_from_source_bytes, third.hit_ratio) == (3 * total, 0, 1.0)
    status = subprocess.run([sys.executable, "-m", "datahoard.cli", "status", str(m.mountpoint)],
                            capture_output=True, text=True, check=True).stdout
    natively = f", {third.fuse.native_counted_opens:,} natively" if counted_by == "file ids" else ""
    assert ("kernel opens  yes: the dataset is cached and the kernel opens files itself "
            f"(still counted, by {counted_by}{natively})") in status


def test_opens_in_a_directory_a_refresh_added_are_counted(s3, bucket, mount_dataset):
    """Counting by file id marks each directory: one a refresh adds is marked when the refresh
    is done, or opens there would not be counted (and their reads, prepaid, would take bytes
    from the cache column)."""
    files = _dataset(s3, bucket, [10_000, 20_000, 30_000])
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-passthrough")
    eventually(lambda: m.stats().kernel_opens, 20, "the view to hand opens to the kernel")
    assert m.stats().fuse.opens_counted_by == "file ids"
    new = {"later/deeper/img.jpg": os.urandom(15_000), "later/img.jpg": os.urandom(25_000)}
    for key, body in new.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    subprocess.run([sys.executable, "-m", "datahoard.cli", "refresh", str(m.mountpoint)], check=True,
                   capture_output=True)
    everything = {**files, **new}
    total = sum(map(len, everything.values()))
    eventually(lambda: m.stats().cached_bytes == total, 30, "warming to cache the new files")
    before = m.stats()
    for key, body in everything.items():
        assert (m.mountpoint / key).read_bytes() == body
    after = m.stats()
    assert after.served_from_cache_bytes - before.served_from_cache_bytes == total
    assert after.served_from_source_bytes == before.served_from_source_bytes


def test_a_dataset_cached_by_reading_it_hands_opens_to_the_kernel_too(s3, bucket, mount_dataset):
    files = _dataset(s3, bucket, [10_000 + i for i in range(6)])
    m = mount_dataset(bucket, "ds", "--no-passthrough")
    keys = list(files)
    assert _digests([m.mountpoint / k for k in keys[:-1]]) == [hashlib.sha256(files[k]).hexdigest() for k in keys[:-1]]
    time.sleep(1.5)
    assert not m.stats().kernel_opens  # one file is still only in the source
    assert (m.mountpoint / keys[-1]).read_bytes() == files[keys[-1]]
    eventually(lambda: m.stats().kernel_opens, 20, "the view to hand opens to the kernel")
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
    total = sum(map(len, files.values()))
    stats = m.stats()
    assert (stats.served_from_source_bytes, stats.served_from_cache_bytes) == (total, total)


def test_a_dataset_with_files_larger_than_a_chunk_keeps_opens_in_the_worker(s3, bucket, mount_dataset):
    _dataset(s3, bucket, [10_000, 9 << 20])  # the second is larger than one 8 MiB chunk
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-passthrough")
    time.sleep(1.5)  # the switch is checked every 0.5 s after warming ends
    assert not m.stats().kernel_opens
    assert "files of up to" in (m.cache_dir / "worker.log").read_text()


def test_no_kernel_opens_keeps_every_open_in_the_worker(s3, bucket, mount_dataset):
    files = _dataset(s3, bucket, [10_000, 20_000])
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-kernel-opens")
    time.sleep(1.5)
    assert not m.stats().kernel_opens
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
    assert m.stats().served_from_cache_bytes == sum(map(len, files.values()))


def test_with_passthrough_opens_stay_in_the_worker_and_are_passed_through(s3, bucket, mount_dataset):
    files = _dataset(s3, bucket, [10_000, 20_000])
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--passthrough")  # forced: small files
    time.sleep(1.5)
    assert not m.stats().kernel_opens
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
    stats = m.stats()
    assert stats.fuse.passthrough and stats.fuse.passthrough_opens == len(files)
    assert stats.served_from_cache_bytes == sum(map(len, files.values()))
    assert "passthrough serves cached files" in (m.cache_dir / "worker.log").read_text()


def test_by_default_a_small_file_dataset_gets_kernel_opens_not_passthrough(s3, bucket, mount_dataset):
    files = _dataset(s3, bucket, [10_000, 20_000])
    m = mount_dataset(bucket, "ds", "--warm", "--wait")

    def switched():
        return m.stats().kernel_opens

    deadline = time.monotonic() + 30
    while not switched() and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = m.stats()
    assert stats.kernel_opens and not stats.fuse.passthrough, stats.fuse
    assert "kernel opens files itself" in stats.fuse.passthrough_note, stats.fuse
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
