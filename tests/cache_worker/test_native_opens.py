"""The native OPEN/RELEASE responder (cache_worker/fusell/fastopen.c) on real mounts against the
S3 server: which opens it answers, that their hits are counted, that eviction and a SIGKILL
never pull a file from under a handle it gave out, and what happens without it."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import signal

import pytest

from datahoard.cache_worker.fusell.passthrough_log import read_log
from datahoard.cache_worker.fusell.passthrough_native import ARM_FH
from tests.support.mounts import datahoard, read_until_passed_through
from tests.support.polling import eventually


def _put(s3, bucket: str, files: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=f"ds/{item[0]}", Body=item[1]), files.items()))


def _records(m, nodeid: int) -> list[tuple[str, int]]:
    """(op, handle) of the backing table's log for one node id, oldest first."""
    return [(op, fh) for op, node, fh, _, _ in read_log(m.cache_dir / "fuse-backing.log") if node == nodeid]


def _id_ops(m, nodeid: int) -> list[str]:
    return [op for op, _ in _records(m, nodeid) if op in "bc"]


def _arm(m, path, body: bytes) -> int:
    """Read ``path`` until an open of it was answered natively; the native opens so far. (The
    first open that finds the file cached may still be served from the page cache: the kernel
    sends the RELEASE of the miss's open asynchronously, and an inode with a caching open left
    cannot be passed through.)"""
    def armed():
        assert path.read_bytes() == body
        return m.stats().fuse.native_opens
    return eventually(armed, 20, what="an open answered natively")


def _cold_read(f) -> bytes:
    """Read a whole open file from its backing store, not the page cache."""
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    f.seek(0)
    return f.read()


@pytest.mark.integration
def test_opens_after_the_first_passthrough_are_answered_natively_and_counted_as_hits(s3, bucket, mount_dataset):
    a = os.urandom(100_000)
    _put(s3, bucket, {"a": a})
    m = mount_dataset(bucket, "ds", "--passthrough")
    path = m.mountpoint / "a"
    assert path.read_bytes() == a  # a miss: fetched and cached
    _arm(m, path, a)  # passed through by Python, which arms it; then natively
    node = os.stat(path).st_ino
    before, opened = m.stats(), [fh for op, fh in _records(m, node) if op == "o"]
    assert [fh for fh in opened if fh >= ARM_FH], "the arm is logged as an open"
    for _ in range(5):
        assert path.read_bytes() == a
    st = m.stats()
    assert st.fuse.native_opens - before.fuse.native_opens == 5
    assert st.fuse.passthrough_opens - before.fuse.passthrough_opens == 5
    assert st.fuse.native_note is None
    # Every hit counted whole at open, as a Python-answered open counts it, and for its reader.
    assert st.served_from_cache_bytes - before.served_from_cache_bytes == 5 * len(a)
    assert st.served_from_source_bytes == len(a)
    assert {(c.namespace, c.pod): c.served_from_cache_bytes for c in st.consumers} == {
        ("", "host"): st.served_from_cache_bytes}
    assert [fh for op, fh in _records(m, node) if op == "o"] == opened, "native opens are not logged"
    out = datahoard("status", str(m.mountpoint)).stdout
    assert f"{st.fuse.native_opens:,} of them answered natively" in out, out


@pytest.mark.integration
def test_a_lookup_answered_once_is_answered_natively_after_the_kernel_forgot_the_name(s3, bucket, mount_dataset):
    """Dropping the kernel's dentries (what memory pressure does to a dataset larger than RAM)
    sends a LOOKUP per file again; the native part answers those the worker answered before."""
    files = {f"d/f{i}": os.urandom(1000 + i) for i in range(20)}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--passthrough")
    before = {k: os.stat(m.mountpoint / k) for k in files}  # LOOKUPs answered by Python
    assert m.stats().fuse.native_lookups == 0
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # dentries and inodes
    after = {k: os.stat(m.mountpoint / k) for k in files}
    assert m.stats().fuse.native_lookups >= len(files)
    assert {k: (s.st_ino, s.st_size) for k, s in after.items()} == {k: (s.st_ino, s.st_size) for k, s in before.items()}
    for k, body in files.items():
        assert (m.mountpoint / k).read_bytes() == body


@pytest.mark.integration
def test_a_native_handle_keeps_its_file_through_eviction_and_the_id_closes_after_it(s3, bucket, mount_dataset):
    """Eviction disarms the file at once (the next open goes to Python), but the backing id -
    the kernel's reference to the evicted file - is closed only when the last native handle is
    released: until then that handle reads the file it opened."""
    a, b = os.urandom(100_000), os.urandom(100_000)
    _put(s3, bucket, {"a": a, "b": b})
    m = mount_dataset(bucket, "ds", "--capacity", "150000", "--passthrough")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # cached
    native = _arm(m, path_a, a)
    node = os.stat(path_a).st_ino
    with open(path_a, "rb", buffering=0) as held:
        assert m.stats().fuse.native_opens == native + 1
        assert (m.mountpoint / "b").read_bytes() == b  # evicts a
        eventually(lambda: m.stats().cached_bytes == len(b), 20, what="a to be evicted")
        assert _cold_read(held) == a
        assert _id_ops(m, node) == ["b"], "the id must stay while a native handle uses it"
    eventually(lambda: _id_ops(m, node) == ["b", "c"], 20, what="the id to close after the last release")
    assert path_a.read_bytes() == a  # fetched again
    assert m.stats().errors == 0


@pytest.mark.integration
def test_native_handles_open_across_a_sigkill_are_released_to_the_next_worker(s3, bucket, mount_dataset, tmp_path):
    """The open counts are in a shared file, so the next worker knows a handle the dead one gave
    out is still open, keeps its id, and closes it once the handle's RELEASE comes to it."""
    from datahoard import runtime

    a, b = os.urandom(100_000), os.urandom(100_000)
    _put(s3, bucket, {"a": a, "b": b})
    mnt = tmp_path / "mnt"
    m = mount_dataset(bucket, "ds", "--capacity", "150000", "--passthrough", mountpoint=mnt)
    path_a = mnt / "a"
    assert path_a.read_bytes() == a  # cached
    native = _arm(m, path_a, a)
    node = os.stat(path_a).st_ino
    held = open(path_a, "rb", buffering=0)
    try:
        assert m.stats().fuse.native_opens == native + 1
        pid = runtime.lookup(mnt).pid
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: not runtime.alive(pid), what="the worker to die")
        assert _cold_read(held) == a  # passthrough reads need no worker
        eventually(lambda: (r := runtime.lookup(mnt)) is not None and r.pid != pid, timeout=60,
                   what="the supervisor to restart the worker")
        assert m.stats().fuse.resumed
        assert path_a.read_bytes() == a  # the inherited arm is checked by Python, then armed again
        assert (mnt / "b").read_bytes() == b  # evicts a: its id must wait for the held handle
        eventually(lambda: m.stats().cached_bytes == len(b), 20, what="a to be evicted")
        assert _cold_read(held) == a
        assert _id_ops(m, node) == ["b"]
    finally:
        held.close()
    eventually(lambda: _id_ops(m, node) == ["b", "c"], 20, what="the id to close after the held handle")
    assert m.stats().errors == 0


@pytest.mark.integration
def test_without_the_native_part_every_open_is_answered_in_python_and_status_says_so(
        s3, bucket, mount_dataset, monkeypatch):
    monkeypatch.setenv("DATAHOARD_NATIVE_OPENS", "0")
    a = os.urandom(100_000)
    _put(s3, bucket, {"a": a})
    m = mount_dataset(bucket, "ds", "--passthrough")
    path_a = m.mountpoint / "a"
    assert path_a.read_bytes() == a  # miss
    hits = read_until_passed_through(m, path_a, a)
    for _ in range(2):
        assert path_a.read_bytes() == a
    st = m.stats()
    assert st.fuse.passthrough_opens == 3 and st.fuse.native_opens == 0
    assert st.served_from_cache_bytes == (hits + 2) * len(a)
    out = datahoard("status", str(m.mountpoint)).stdout
    assert "opens answered in Python: switched off (DATAHOARD_NATIVE_OPENS=0)" in out, out


@pytest.mark.integration
def test_a_cache_file_changed_after_it_was_armed_is_never_passed_through_natively(s3, bucket, mount_dataset):
    """The native part answers an open only while the cache file is still the one Python
    verified (a stat at every open); a stray writer's change sends the open back to Python,
    which checks the file again: the reader gets the object's bytes, never the writer's."""
    a = os.urandom(100_000)
    _put(s3, bucket, {"a": a})
    m = mount_dataset(bucket, "ds", "--passthrough")
    path = m.mountpoint / "a"
    assert path.read_bytes() == a
    native = _arm(m, path, a)
    (cached,) = [p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file()]
    with open(cached, "r+b") as f:  # a stray writer, same size
        f.seek(4096)
        f.write(os.urandom(4096))
    with open(path, "rb", buffering=0) as f:
        assert _cold_read(f) == a
    assert m.stats().fuse.native_opens == native, "that open must not have been answered natively"
    assert path.read_bytes() == a and m.stats().errors == 0


@pytest.mark.integration
def test_a_warmed_dataset_is_armed_ahead_so_its_first_epoch_never_asks_python(s3, bucket, mount_dataset):
    """Once the dataset is fully cached, every file is armed and every name remembered before
    any reader asks (cache_worker/arm_ahead.py): the first epoch's opens and LOOKUPs are all
    answered natively, and counted as hits as any open is."""
    files = {f"c{i % 3}/f{i}": os.urandom(2000 + i) for i in range(30)}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--passthrough")
    eventually(lambda: m.stats().fuse.native_armed == len(files), 20, what="every file to be armed ahead")
    before = m.stats()
    assert before.fuse.passthrough_opens == 0 and before.served_from_cache_bytes == 0
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body
    st = m.stats()
    assert st.fuse.native_opens == st.fuse.passthrough_opens == len(files), "no open of the first epoch in Python"
    assert st.fuse.native_lookups == len(files) + 3, "every name (three directories, the files) natively"
    assert st.served_from_cache_bytes == sum(map(len, files.values()))
    assert "armed 30 files and remembered 33 names" in (m.cache_dir / "worker.log").read_text()
    out = datahoard("status", str(m.mountpoint)).stdout
    assert f"{len(files)} of them answered natively ({len(files)} files armed)" in out, out


@pytest.mark.integration
def test_warm_wait_returns_once_every_file_is_armed(s3, bucket, mount_dataset):
    """``--warm --wait`` promises a first epoch at full speed: it returns when arming ahead is
    done, not when the last byte is cached (arming takes about 120 us a file after that)."""
    files = {f"c{i % 10}/f{i}": b"%d" % i for i in range(1500)}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--passthrough")
    st = m.stats()
    assert st.fuse.native_armed == len(files) and not st.fuse.arming_ahead
    assert "armed 1,500 files for the native responder" in m.output, m.output
