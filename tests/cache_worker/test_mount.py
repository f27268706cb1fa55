"""``datahoard mount`` end to end: a real S3 server over HTTP, a real FUSE mount, the real CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from datahoard import runtime
from tests.support.mounts import datahoard, force_unmount, unmount

pytestmark = pytest.mark.integration

MiB = 1 << 20


def put_tree(s3, bucket, files: dict[str, bytes], prefix="ds/"):
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def sample_files() -> dict[str, bytes]:
    return {
        "class0/img 1.jpg": os.urandom(110_000),
        "class0/img2.jpg": os.urandom(90_000),
        "class1/ünïcödé 名前.jpg": os.urandom(50_000),
        "deep/a/b/c/d/e/f/g/h.bin": os.urandom(3_000),
        "empty.txt": b"",
        "shard.bin": os.urandom(20 * MiB + 12345),  # several chunks
    }


def read_all(root, files):
    return {key: open(os.path.join(root, key), "rb").read() for key in files}


def test_every_object_reads_byte_for_byte(s3, bucket, mount_dataset):
    files = sample_files()
    put_tree(s3, bucket, files)
    m = mount_dataset(bucket, "ds")
    assert sorted(os.listdir(m.mountpoint)) == ["class0", "class1", "deep", "empty.txt", "shard.bin"]
    assert os.stat(m.mountpoint / "shard.bin").st_size == len(files["shard.bin"])
    assert read_all(m.mountpoint, files) == files
    # Reading again (now from the cache) gives the same bytes.
    assert read_all(m.mountpoint, files) == files
    stats = m.stats()
    assert stats.files == len(files) and stats.total_bytes == sum(map(len, files.values()))
    assert stats.cached_bytes == stats.total_bytes - 0
    assert stats.errors == 0


def test_errno_for_writes_and_missing_paths(s3, bucket, mount_dataset):
    put_tree(s3, bucket, {"a/f.txt": b"data"})
    m = mount_dataset(bucket, "ds")
    root = m.mountpoint
    for action in (
        lambda: open(root / "a/f.txt", "wb"),
        lambda: open(root / "a/f.txt", "r+b"),
        lambda: open(root / "new.txt", "w"),
        lambda: os.mkdir(root / "d"),
        lambda: os.unlink(root / "a/f.txt"),
        lambda: os.rename(root / "a/f.txt", root / "a/g.txt"),
        lambda: os.chmod(root / "a/f.txt", 0o777),
        lambda: os.truncate(root / "a/f.txt", 0),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        open(root / "a/missing.txt", "rb")
    with pytest.raises(NotADirectoryError):
        os.listdir(root / "a/f.txt")
    assert (root / "a/f.txt").read_bytes() == b"data"


def test_unsafe_keys_stay_out_of_the_view(s3, bucket, mount_dataset):
    put_tree(s3, bucket, {"ok.txt": b"ok", "../escape": b"no", "a//b": b"no", "x/./y": b"no"}, prefix="ds/")
    s3.put_object(Bucket=bucket, Key="secret-outside-prefix", Body=b"no")
    m = mount_dataset(bucket, "ds")
    visible = [os.path.relpath(os.path.join(d, f), m.mountpoint) for d, _, fs in os.walk(m.mountpoint) for f in fs]
    assert visible == ["ok.txt"]
    assert m.stats().skipped_keys == 3


def test_file_and_directory_of_the_same_name(s3, bucket, mount_dataset):
    put_tree(s3, bucket, {"a": b"file a", "a/b": b"file b"})
    m = mount_dataset(bucket, "ds")
    assert (m.mountpoint / "a").is_dir()
    assert (m.mountpoint / "a/b").read_bytes() == b"file b"
    assert m.stats().files == 1


def test_sparse_reads_into_a_multi_gb_object_fetch_only_what_they_need(s3, bucket, mount_dataset):
    """A 2.5 GB object with a known pattern; random 4 KiB reads must fetch a few chunks only."""
    size = 2560 * MiB
    block = MiB

    def pattern(i: int) -> bytes:
        return hashlib.sha256(str(i).encode()).digest() * (block // 32)

    upload = s3.create_multipart_upload(Bucket=bucket, Key="ds/huge.bin")
    parts = []
    part_size = 256 * MiB
    for n, start in enumerate(range(0, size, part_size), 1):
        body = b"".join(pattern(i) for i in range(start // block, (start + part_size) // block))
        etag = s3.upload_part(Bucket=bucket, Key="ds/huge.bin", UploadId=upload["UploadId"], PartNumber=n, Body=body)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket=bucket, Key="ds/huge.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    m = mount_dataset(bucket, "ds")
    offsets = [7 * MiB + 5, 900 * MiB + 123, 1800 * MiB, size - 4096, 2048 * MiB - 2]
    with open(m.mountpoint / "huge.bin", "rb") as f:
        for off in offsets:
            data = os.pread(f.fileno(), 4096, off)
            expected = b"".join(pattern(i) for i in range(off // block, (off + 4096) // block + 1))
            start = off - (off // block) * block
            assert data == expected[start : start + 4096][: size - off]
    fetched = m.stats().fetched_bytes
    assert fetched <= len(offsets) * 2 * 8 * MiB, f"fetched {fetched} bytes for {len(offsets)} small reads"


def test_concurrent_readers_threads_and_processes(s3, bucket, mount_dataset):
    files = {f"d{i % 4}/f{i}.bin": os.urandom(30_000 + i * 997) for i in range(60)}
    files["big.bin"] = os.urandom(17 * MiB)
    put_tree(s3, bucket, files)
    m = mount_dataset(bucket, "ds")
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}

    def check(key):
        return key, hashlib.sha256((m.mountpoint / key).read_bytes()).hexdigest()

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(check, list(files) * 3))
    assert results == digests

    script = (
        "import hashlib,sys,json;root=sys.argv[1];keys=json.loads(sys.argv[2]);"
        "print(json.dumps({k: hashlib.sha256(open(root+'/'+k,'rb').read()).hexdigest() for k in keys}))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(m.mountpoint), json.dumps(list(files))], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert json.loads(out) == digests


def test_restart_reuses_index_and_cache(s3, bucket, mount_dataset, tmp_path):
    files = {"a.bin": os.urandom(200_000), "b.bin": os.urandom(9 * MiB)}
    put_tree(s3, bucket, files)
    cache = tmp_path / "cache"
    m = mount_dataset(bucket, "ds", cache_dir=cache)
    assert read_all(m.mountpoint, files) == files
    before = m.stats()
    unmount(m)
    # The source is gone: only the persisted index and cache can serve the second mount.
    for key in files:
        s3.delete_object(Bucket=bucket, Key="ds/" + key)
    m2 = mount_dataset(bucket, "ds", cache_dir=cache)
    assert read_all(m2.mountpoint, files) == files
    stats = m2.stats()
    # The counters continue the first mount's (counters.json): nothing was added but hits.
    assert stats.fetched_bytes == before.fetched_bytes
    assert stats.served_from_source_bytes == before.served_from_source_bytes
    assert stats.served_from_cache_bytes - before.served_from_cache_bytes == sum(map(len, files.values()))
    # --refresh lists again and sees the deletions (and an addition: a prefix with nothing
    # under it is refused, see test_cli_validation.py).
    unmount(m2)
    s3.put_object(Bucket=bucket, Key="ds/c.bin", Body=b"new")
    m3 = mount_dataset(bucket, "ds", "--refresh", cache_dir=cache)
    assert os.listdir(m3.mountpoint) == ["c.bin"]


def test_eviction_keeps_the_cache_under_capacity(s3, bucket, mount_dataset):
    files = {f"f{i}.bin": os.urandom(300_000) for i in range(12)}
    put_tree(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--capacity", "1Mi")
    for _ in range(2):
        for key, body in files.items():
            assert (m.mountpoint / key).read_bytes() == body
            assert m.stats().cached_bytes <= MiB
    assert m.stats().errors == 0


def test_object_larger_than_the_cache_is_read_through(s3, bucket, mount_dataset):
    body = os.urandom(3 * MiB)
    put_tree(s3, bucket, {"big.bin": body})
    m = mount_dataset(bucket, "ds", "--capacity", "1Mi")
    assert (m.mountpoint / "big.bin").read_bytes() == body
    stats = m.stats()
    assert stats.cached_bytes == 0 and stats.errors == 0
    assert "reading through without caching" in stats.degraded


def test_corrupt_cache_file_is_refetched_after_restart(s3, bucket, mount_dataset, tmp_path):
    body = os.urandom(100_000)
    put_tree(s3, bucket, {"x.bin": body})
    cache = tmp_path / "cache"
    m = mount_dataset(bucket, "ds", cache_dir=cache)
    assert (m.mountpoint / "x.bin").read_bytes() == body
    fetched = m.stats().fetched_bytes
    unmount(m)
    [chunk] = [p for p in (cache / "chunks" / "data").rglob("*") if p.is_file()]
    data = bytearray(chunk.read_bytes())
    data[1234] ^= 0xFF
    chunk.write_bytes(bytes(data))
    m2 = mount_dataset(bucket, "ds", cache_dir=cache)
    assert (m2.mountpoint / "x.bin").read_bytes() == body
    assert m2.stats().fetched_bytes - fetched == len(body)  # counted on top of the saved counts


def test_source_down_gives_eio_for_misses_and_cached_data_still_reads(s3_server, mount_dataset, tmp_path):
    from tests.support.s3server import start_moto

    server = start_moto()
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="flaky")
        put_tree(s3, "flaky", {"cached.bin": b"c" * 1000, "uncached.bin": b"u" * 1000})
        m = mount_dataset("flaky", "ds", endpoint=server.endpoint)
        assert (m.mountpoint / "cached.bin").read_bytes() == b"c" * 1000
    finally:
        server.stop()
    with pytest.raises(OSError) as info:
        (m.mountpoint / "uncached.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert (m.mountpoint / "cached.bin").read_bytes() == b"c" * 1000
    stats = m.stats()
    assert stats.errors >= 1 and "uncached.bin" in stats.last_error


@pytest.mark.parametrize(
    "uri_bucket, extra, message",
    [
        ("no-such-bucket", (), "bucket does not exist: s3://no-such-bucket/ds/"),
        (None, ("--endpoint-url", "http://127.0.0.1:9"), "cannot reach S3 endpoint http://127.0.0.1:9"),
    ],
)
def test_mount_errors_are_one_clear_line(s3_server, bucket, tmp_path, uri_bucket, extra, message):
    result = datahoard(
        "mount", f"s3://{uri_bucket or bucket}/ds", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"),
        "--endpoint-url", s3_server.endpoint, *extra, check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datahoard: error: ") and message in lines[0], result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_fatal_error_is_also_the_termination_message(tmp_path):
    """In a pod the operator sets DATAHOARD_TERMINATION_LOG to the container's
    terminationMessagePath; the kubelet keeps at most 4 KiB of it, the worker writes 1 KiB."""
    term = tmp_path / "termination-log"
    prefix = "p" * 2000  # the source URI is in the message: long enough to be cut
    result = datahoard("mount", f"s3://b/{prefix}", str(tmp_path / "mnt"), "--cache-dir",
                       str(tmp_path / "c"), "--endpoint-url", "http://127.0.0.1:9", check=False,
                       env={"DATAHOARD_TERMINATION_LOG": str(term), "DATAHOARD_S3_MAX_ATTEMPTS": "1"})
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("datahoard: error: cannot reach S3 endpoint http://127.0.0.1:9"), result.stderr
    written = term.read_text()
    assert len(written.encode()) == 1025 and written == line.removeprefix("datahoard: error: ")[:1024] + "\n"


def test_cli_usage_errors(tmp_path):
    result = datahoard("mount", "s3://b/x", str(tmp_path), "--capacity", "lots", check=False)
    assert result.returncode == 2 and "not a size: 'lots'" in result.stderr
    result = datahoard("status", str(tmp_path), check=False)
    assert result.returncode == 1 and result.stderr.strip() == f"datahoard: error: no datahoard mount is running at {tmp_path}"
    result = datahoard("mount", "gs://b/x", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), check=False)
    assert result.returncode == 1 and "unsupported source 'gs://b/x'" in result.stderr


def test_status_json_metrics_and_health(s3, bucket, mount_dataset):
    put_tree(s3, bucket, {"f.bin": os.urandom(1000)})
    m = mount_dataset(bucket, "ds")
    (m.mountpoint / "f.bin").read_bytes()
    human = datahoard("status", str(m.mountpoint)).stdout
    assert "hit ratio" in human and re.search(r"^files +1$", human, re.M), human
    doc = json.loads(datahoard("status", str(m.mountpoint), "--json").stdout)
    assert doc["files"] == 1 and doc["served_from_source_bytes"] == 1000 and doc["hit_ratio"] == 0.0
    record = runtime.lookup(m.mountpoint)
    metrics = urllib.request.urlopen(record.stats_url + "/metrics").read().decode()
    assert 'datahoard_served_bytes_total{origin="source",source="s3://' in metrics
    assert urllib.request.urlopen(record.stats_url + "/healthz").status == 200


def test_umount_stops_the_worker(s3, bucket, mount_dataset):
    put_tree(s3, bucket, {"f": b"x"})
    m = mount_dataset(bucket, "ds")
    pid = runtime.lookup(m.mountpoint).pid
    unmount(m)
    assert runtime.lookup(m.mountpoint) is None
    assert not runtime.alive(pid)
    result = datahoard("umount", str(m.mountpoint), check=False)
    assert result.returncode == 1 and "is not mounted" in result.stderr


def test_dead_worker_mount_is_replaced(s3, bucket, mount_dataset, tmp_path):
    """A worker killed with SIGKILL leaves a dead mount (ENOTCONN); mounting again clears it."""
    put_tree(s3, bucket, {"f": b"payload"})
    cache = tmp_path / "cache"
    m = mount_dataset(bucket, "ds", "--max-restarts", "0", cache_dir=cache)  # no supervisor restart
    os.kill(runtime.lookup(m.mountpoint).pid, 9)
    with pytest.raises(OSError) as info:
        os.listdir(m.mountpoint)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    m2 = mount_dataset(bucket, "ds", cache_dir=cache, mountpoint=m.mountpoint)
    assert (m2.mountpoint / "f").read_bytes() == b"payload"
    force_unmount(m.mountpoint)


def test_one_mount_per_cache_directory(s3, bucket, mount_dataset, tmp_path):
    put_tree(s3, bucket, {"f": b"x"})
    cache = tmp_path / "shared-cache"
    mount_dataset(bucket, "ds", cache_dir=cache)
    result = datahoard("mount", f"s3://{bucket}/ds", str(tmp_path / "second"), "--cache-dir", str(cache),
                       "--endpoint-url", s3.meta.endpoint_url, check=False)
    assert result.returncode == 1
    assert f"cache directory {cache} is in use by another datahoard mount" in result.stderr
