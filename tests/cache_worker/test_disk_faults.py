"""The node-local cache under bad luck, for real: a cache disk another process fills, a damaged
``chunks.db``, a private mount's cache, chunks corrupted under a running worker, and keys too
long to be paths."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from datahoard.cache_worker.store import CacheFull, ChunkId, ChunkStore
from tests.support.mounts import datahoard
from tests.support.polling import eventually

MiB = 1 << 20


def _put(s3, bucket, files):
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)


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
@pytest.mark.parametrize("passthrough", ["--passthrough", "--no-passthrough"], ids=["passthrough", "page-cache"])
def test_a_cache_disk_filled_by_another_writer_reads_through_says_why_and_recovers(
        s3, bucket, mount_dataset, small_tmpfs, passthrough):
    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(150_000 + i * 1000) for i in range(40)}
    files["large.bin"] = os.urandom(20 * MiB + 12345)  # three chunks: ranged reads
    _put(s3, bucket, files)
    keys = sorted(files)
    m = mount_dataset(bucket, "ds", "--capacity", "1Gi", passthrough,
                      cache_dir=small_tmpfs / "cache")
    assert m.stats().fuse.passthrough == (passthrough == "--passthrough")
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
    # Space is back, and that is noticed with no read reaching the worker: the kernel answers
    # the reads of cached files itself (page cache or passthrough), so recovery must not wait
    # for a fill (it used to, and a reader that made none before the retry window left
    # `degraded` set for good).
    eventually(lambda: m.stats().degraded is None, 10, "degraded to clear with no reads")
    for key in keys:  # what the full disk could not take is cached now, as it is read
        assert (m.mountpoint / key).read_bytes() == files[key], key
    total = sum(len(b) for b in files.values())
    stats = eventually(lambda: (s := m.stats()).cached_bytes == total and s, 10, "every file cached")
    assert stats.errors == 0 and stats.degraded is None, (stats.last_error, stats.degraded)


@pytest.mark.integration
def test_warming_on_a_disk_another_writer_filled_finishes_the_job_once_room_is_back(
        s3, bucket, mount_dataset, small_tmpfs):
    """Warming that meets a full disk reads through and ends with files missing; once the disk
    has room again (and nobody reads), the worker notices and warms the rest."""
    files = {f"f{i:02d}.bin": os.urandom(400_000 + i) for i in range(30)}
    _put(s3, bucket, files)
    total = sum(len(b) for b in files.values())
    st = os.statvfs(small_tmpfs)
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - 3 * MiB), str(small_tmpfs / "filler")],
                   check=True)  # 3 MiB left: the record opens, a quarter of the dataset fits
    m = mount_dataset(bucket, "ds", "--capacity", "1Gi", "--warm", "--wait", cache_dir=small_tmpfs / "cache")
    stats = eventually(lambda: (s := m.stats()).warming.state != "running" and s, what="warming to end")
    assert stats.warming.state == "done" and stats.cached_bytes < total / 2, stats
    (small_tmpfs / "filler").unlink()
    stats = eventually(lambda: (s := m.stats()).cached_bytes == total and s.degraded is None and s,
                       30, "the rest warmed with no reads")
    assert stats.errors == 0, stats.last_error
    # Every file is small and now cached: the kernel takes over the opens, as on any other mount.
    eventually(lambda: m.stats().kernel_opens, 10, "the kernel to serve opens")
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body, key


def test_a_store_finds_room_again_without_a_fill(small_tmpfs):
    """``recheck_room``: no room, no change; room, caching resumes and recency kept meanwhile is
    written."""
    store = ChunkStore(small_tmpfs / "chunks", capacity=1 << 30)
    kept = ChunkId("a" * 40, 0)
    store.put(kept, b"k" * 100_000)
    _fill(small_tmpfs / "filler")
    with pytest.raises(CacheFull):
        store.put(ChunkId("b" * 40, 0), os.urandom(5 * MiB))
    assert store.problem and "full" in store.problem
    assert store.recheck_room() is False and store.problem
    (small_tmpfs / "filler").unlink()
    assert store.recheck_room() is True and store.problem is None
    assert store.recheck_room() is False  # nothing to recover from
    store.put(ChunkId("c" * 40, 0), b"fresh")
    assert store.read(ChunkId("c" * 40, 0), 0, 5) == b"fresh"
    store.close()


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
    stats = eventually(lambda: (s := m.stats()).direct.state in ("ready", "failed") and s, what="the direct tree")
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


# -- a damaged chunks.db -----------------------------------------------------------------------
def _populated_store(root: Path, n: int = 3000) -> None:
    """A store whose record spans many pages, closed (so everything is in chunks.db itself)."""
    store = ChunkStore(root, capacity=1 << 30)
    for i in range(n):
        store.put(ChunkId(f"{i:040x}", 0), b"chunk %d " % i * 10)
    store.close()


def _garbage_pages(db: Path) -> None:
    with open(db, "r+b") as f:
        for page in (2, 7, 11):
            f.seek(page * 4096)
            f.write(os.urandom(4096))


def _truncate(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2 + 123)


def _bad_header(db: Path) -> None:
    with open(db, "r+b") as f:
        f.write(os.urandom(100))


def _directory(db: Path) -> None:
    db.unlink()
    db.mkdir()
    (db / "something").write_bytes(b"x")


@pytest.mark.parametrize("damage", [_garbage_pages, _truncate, _bad_header, _directory],
                         ids=["garbage-pages", "truncated", "bad-header", "a-directory"])
def test_a_damaged_record_is_moved_aside_and_the_cache_starts_empty(tmp_path, damage, caplog):
    _populated_store(tmp_path)
    db = tmp_path / "chunks.db"
    damage(db)
    with caplog.at_level("ERROR"):
        store = ChunkStore(tmp_path, capacity=1 << 30)
    assert store.problem and str(db) in store.problem and "damaged" in store.problem, store.problem
    assert any(str(db) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "chunks.db.damaged").exists()
    # The old chunk files could not be checked without their CRCs: none is served, none is left.
    assert store.read(ChunkId(f"{5:040x}", 0), 0, 5) is None
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []
    assert store.used_bytes == 0
    store.put(ChunkId(f"{5:040x}", 0), b"fresh bytes")
    assert store.read(ChunkId(f"{5:040x}", 0), 0, 5) == b"fresh"
    store.close()
    again = ChunkStore(tmp_path, capacity=1 << 30)  # the new record is sound: nothing to report
    assert again.problem is None and again.read(ChunkId(f"{5:040x}", 0), 6, 5) == b"bytes"
    again.close()


@pytest.mark.integration  # chattr +i: needs root (CAP_LINUX_IMMUTABLE)
def test_a_record_that_cannot_be_replaced_still_serves_reads_through(tmp_path):
    """The damaged record cannot be moved aside (its directory is read-only, as for a non-root
    worker on a cache it does not own): the store opens in memory and refuses to cache."""
    _populated_store(tmp_path, n=200)
    _bad_header(tmp_path / "chunks.db")
    if subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")  # even root cannot rename in it
    try:
        store = ChunkStore(tmp_path, capacity=1 << 30)
        assert store.problem and "could not be replaced" in store.problem, store.problem
        assert store.read(ChunkId(f"{5:040x}", 0), 0, 5) is None
        with pytest.raises(CacheFull):
            store.put(ChunkId(f"{5:040x}", 0), b"x")
        store.close()
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    assert len([p for p in (tmp_path / "data").rglob("*") if p.is_file()]) == 200  # nothing touched


@pytest.mark.integration
def test_a_worker_with_a_damaged_record_starts_serves_right_bytes_and_says_so(s3, bucket, mount_dataset, tmp_path):
    files = {f"f{i}.bin": os.urandom(30_000 + i) for i in range(300)}
    files["large.bin"] = os.urandom(17 * MiB)
    _put(s3, bucket, files)
    cache = tmp_path / "cache"
    m = mount_dataset(bucket, "ds", "--warm", "--wait", cache_dir=cache, mountpoint=tmp_path / "mnt")
    datahoard("umount", str(m.mountpoint))
    db = cache / "chunks" / "chunks.db"
    assert db.stat().st_size > 12 * 4096
    _garbage_pages(db)

    m = mount_dataset(bucket, "ds", cache_dir=cache, mountpoint=tmp_path / "mnt")
    for key, body in files.items():
        assert (m.mountpoint / key).read_bytes() == body, key
    stats = m.stats()
    assert stats.errors == 0, stats.last_error
    assert stats.degraded and str(db) in stats.degraded and "damaged" in stats.degraded, stats.degraded
    assert stats.cached_bytes == sum(len(b) for b in files.values())  # cached again from scratch
    log = (cache / "worker.log").read_text()
    assert f"the cache record {db} is damaged" in log, log[-2000:]


# -- a chunk changed on disk under a running worker ---------------------------------------------
def _overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["in-place", "in-place-mtime-restored", "replaced", "truncated"])
def test_a_chunk_changed_after_verification_is_checked_again_before_it_is_served(tmp_path, how):
    store = ChunkStore(tmp_path, capacity=1 << 30)
    chunk = ChunkId("c" * 40, 0)
    body = os.urandom(300_000)
    store.put(chunk, body)
    assert store.read(chunk, 1000, 10) == body[1000:1010]  # verified, and served
    path = store.path(chunk.object_id)
    before = os.stat(path)
    if how.startswith("in-place"):
        _overwrite(path, 1000, b"\0" * 10 if body[1000:1010] != b"\0" * 10 else b"\1" * 10)
        if how == "in-place-mtime-restored":  # a writer that covers its tracks: ctime still moves
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif how == "replaced":
        other = tmp_path / "other"
        other.write_bytes(os.urandom(len(body)))
        os.replace(other, path)
    else:
        os.truncate(path, 2000)
    assert store.read(chunk, 1000, 10) is None  # dropped, to be refetched: never the wrong bytes
    assert not path.exists() and not store.contains(chunk)
    store.put(chunk, body)
    assert store.read(chunk, 1000, 10) == body[1000:1010]


@pytest.mark.integration
def test_a_chunk_corrupted_under_a_running_worker_is_never_served(s3, bucket, mount_dataset):
    files = {"large.bin": os.urandom(20 * MiB + 4321)}  # three chunks; opens keep no page cache
    _put(s3, bucket, files)
    body = files["large.bin"]
    m = mount_dataset(bucket, "ds")
    assert (m.mountpoint / "large.bin").read_bytes() == body  # every chunk verified and served
    files_on_disk = [p for p in (m.cache_dir / "chunks" / "data").rglob("*") if p.is_file()]
    assert len(files_on_disk) == 1  # one file per object, its three chunks at their offsets
    for index in range(3):  # a stray writer scribbles over every chunk, same size
        _overwrite(files_on_disk[0], index * 8 * MiB + 4096, os.urandom(4096))
    with open(m.mountpoint / "large.bin", "rb") as f:
        for _ in range(2):  # the first pass refetches, the second serves the refetched chunks
            f.seek(0)
            assert f.read() == body
            for offset in (4096, 8 * MiB + 4096, 16 * MiB + 4096):
                f.seek(offset)
                assert f.read(4096) == body[offset:offset + 4096]
    stats = m.stats()
    assert stats.errors == 0, stats.last_error
    log = (m.cache_dir / "worker.log").read_text()
    # The first chunk read is found changed; the object was complete, so it is dropped whole.
    assert f"cached chunk {files_on_disk[0].name}.0 changed on disk since it was verified" in log, log[-3000:]


# -- keys too long to be paths ------------------------------------------------------------------
@pytest.mark.integration
def test_a_key_longer_than_path_max_is_skipped_and_counted_not_fatal_to_the_direct_tree(s3, bucket, mount_dataset):
    long_key = "/".join(["d" * 200] * 25) + "/f.bin"  # 5,006 bytes: each name fits, the path does not
    assert len(long_key) > 4096
    files = {"a/one.bin": os.urandom(10_000), "two.bin": os.urandom(20_000), long_key: b"unreachable"}
    _put(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--direct", "--warm", "--wait")
    stats = eventually(lambda: (s := m.stats()).direct.state in ("ready", "failed") and s, what="the direct tree")
    assert stats.direct.state == "ready", (stats.direct.message or "")[:300]
    assert stats.skipped_keys == 1 and stats.files == 2
    assert sorted(os.listdir(m.mountpoint)) == ["a", "two.bin"]
    assert (m.mountpoint / "a" / "one.bin").read_bytes() == files["a/one.bin"]
    assert "skipped keys" in datahoard("status", str(m.mountpoint)).stdout


def test_the_longest_key_kept_still_fits_under_a_prefix_and_messages_stay_short():
    from datahoard.cache_worker.keys import _KEY_MAX, key_to_path, shown

    fits = ("k" * 199 + "/") * 15 + "z" * (_KEY_MAX - 3000)
    assert key_to_path(fits) is not None and len(fits) == _KEY_MAX
    assert key_to_path(fits + "y") is None
    assert key_to_path("é" * (_KEY_MAX // 2 + 1)) is None  # counted in bytes, not characters
    assert len(shown("x" * 5000)) < 200 and "5000 bytes" in shown("x" * 5000)


@pytest.mark.integration
def test_a_store_opened_on_a_full_disk_serves_what_it_has_and_reads_the_rest_through(small_tmpfs):
    """A worker restarted on a disk that is already full must start, serve what it has (SQLite
    cannot make the record's shared-memory file there: it is opened read-only and unchanging),
    read the rest through, and drop nothing."""
    root = small_tmpfs / "chunks"
    store = ChunkStore(root, capacity=1 << 30)
    body = os.urandom(500_000)
    store.put(ChunkId("e" * 40, 0), body)
    store.close()
    _fill(small_tmpfs / "filler")
    store = ChunkStore(root, capacity=1 << 30)
    assert store.read(ChunkId("e" * 40, 0), 0, len(body)) == body
    assert store.read(ChunkId("9" * 40, 0), 0, 10) is None
    with pytest.raises(CacheFull):
        store.put(ChunkId("f" * 40, 0), os.urandom(500_000))
    assert store.problem and "cannot open the cache record" in store.problem, store.problem
    store.close()
    (small_tmpfs / "filler").unlink()
    again = ChunkStore(root, capacity=1 << 30)
    assert again.read(ChunkId("e" * 40, 0), 0, len(body)) == body  # nothing was dropped
    again.close()
