"""With kernel opens (a cached dataset of small files, no passthrough), reads that miss the page
cache are answered by the native part from the verified cache file (fusell/fastopen.c
``try_read``), never with a file changed since Python checked it, and the counts stay exact."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.mounts import datahoard
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


def _put(s3, bucket: str, files: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=f"ds/{item[0]}", Body=item[1]), files.items()))


def _cold(path) -> bytes:
    """The whole file, past the page cache: its pages are dropped first."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.readall()


def _kernel_opens_mount(s3, bucket, mount_dataset, files):
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-passthrough")
    st = m.stats()
    assert st.kernel_opens and st.fuse.native_armed == len(files), st.fuse
    return m


def test_reads_past_the_page_cache_are_answered_natively_and_counted_once(s3, bucket, mount_dataset):
    files = {f"c{i % 3}/f{i}": os.urandom(50_000 + 999 * i) for i in range(12)}
    files["big"] = os.urandom(3 << 20)  # several reads of up to 1 MiB each
    m = _kernel_opens_mount(s3, bucket, mount_dataset, files)
    before = m.stats()
    for key, body in files.items():
        assert _cold(m.mountpoint / key) == body
    st = m.stats()
    assert st.fuse.native_reads - before.fuse.native_reads >= len(files)
    total = sum(map(len, files.values()))
    assert st.served_from_cache_bytes - before.served_from_cache_bytes == total  # each open, once
    assert st.served_from_source_bytes == before.served_from_source_bytes
    out = datahoard("status", str(m.mountpoint)).stdout
    assert f"reads past the page cache answered natively: {st.fuse.native_reads:,} ({len(files)} files armed)" in out, out


def test_a_cache_file_changed_after_it_was_armed_is_never_read_natively(s3, bucket, mount_dataset):
    """The native part reads only a cache file with the identity Python verified (checked on
    the descriptor it reads); a stray writer's change sends the read to Python, which checks the
    bytes again: the reader gets the object's bytes, never the writer's."""
    a = os.urandom(100_000)
    m = _kernel_opens_mount(s3, bucket, mount_dataset, {"a": a})
    (cached,) = [p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file()]
    with open(cached, "r+b") as f:  # a stray writer, same size
        f.seek(4096)
        f.write(os.urandom(4096))
    before = m.stats().fuse.native_reads
    assert _cold(m.mountpoint / "a") == a
    assert m.stats().fuse.native_reads == before, "that read must not have been answered natively"


def test_an_evicted_cache_file_is_fetched_again_by_python(s3, bucket, mount_dataset):
    """Gone from the cache (evicted, or removed by hand): the native part cannot open it, Python
    answers the read, fetching the object again, and the bytes fetched count as from the source."""
    a = os.urandom(100_000)
    m = _kernel_opens_mount(s3, bucket, mount_dataset, {"a": a})
    (cached,) = [p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file()]
    cached.unlink()
    before = m.stats()
    assert _cold(m.mountpoint / "a") == a
    st = m.stats()
    assert st.fuse.native_reads == before.fuse.native_reads
    assert st.served_from_source_bytes - before.served_from_source_bytes == len(a)


def test_a_refresh_disarms_the_reads_of_files_it_removed_or_replaced(s3, bucket, mount_dataset):
    """Arms are bounded; the arms of ids a refresh removed or replaced are given back, so files
    still listed keep them (without this the three old arms stayed: 5 armed, not 3). A
    descriptor opened before the refresh still reads the version it opened, now through Python.
    What status calls cached is the new snapshot's bytes, not the old versions' too (it said
    158.6%)."""
    old = {"kept": os.urandom(60_000), "swapped": os.urandom(61_000), "gone": os.urandom(62_000)}
    m = _kernel_opens_mount(s3, bucket, mount_dataset, old)
    opened_before = open(m.mountpoint / "swapped", "rb", buffering=0)
    new = {"swapped": os.urandom(70_000), "added": os.urandom(80_000)}
    _put(s3, bucket, new)
    s3.delete_object(Bucket=bucket, Key="ds/gone")
    out = datahoard("refresh", str(m.mountpoint)).stdout
    assert "1 changed" in out and "1 removed" in out, out

    new_total = len(old["kept"]) + sum(map(len, new.values()))

    def settled() -> bool:  # the new snapshot warmed, "fully cached" decided again, arming done
        st = m.stats()
        return (st.warming.state == "done" and st.warming.bytes_done == st.warming.bytes_total == new_total
                and st.kernel_opens and not st.fuse.arming_ahead)
    eventually(settled, what="the refreshed dataset cached and armed")
    st = m.stats()
    assert st.fuse.native_armed == 3, st.fuse  # kept, the new swapped, added
    # The old versions are still in the store (until evicted), but "cached" is this snapshot's.
    assert st.cached_bytes == st.total_bytes == new_total, (st.cached_bytes, st.total_bytes)
    for key, body in {"kept": old["kept"], **new}.items():
        assert _cold(m.mountpoint / key) == body
    os.posix_fadvise(opened_before.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert opened_before.readall() == old["swapped"]
    opened_before.close()
