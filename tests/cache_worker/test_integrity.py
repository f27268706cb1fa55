"""Bytes corrupted between the store and the worker are never served and never cached.

A fault proxy in front of the real S3 server (moto over HTTP) flips 8 bytes of matching GET
bodies and delivers them with success: right status, right length, right headers. For every
kind of object (small, large in chunks, multipart, with S3 additional checksums, SSE-KMS) the
reader either gets the right bytes (after a refetch) or an error, never the wrong bytes; and
after the proxy is gone and a restart, the cache holds (and serves without the source) exactly
the right bytes. The cache stack is the worker's own (S3Source, ChunkStore, DatasetCache),
with small chunks so large objects stay small; one test goes through a real FUSE mount.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.config
import pytest

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache, ReadState
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.s3 import S3Options, S3Source
from datahoard.cache_worker.source import SourceError
from datahoard.cache_worker.store import ChunkStore
from datahoard import runtime
from tests.support.faults import Fault, FaultProxy
from tests.support.mounts import datahoard

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
#: Objects up to 6 MiB are fetched whole (one part of 5 MiB and a small one still is); larger
#: ones in 1 MiB chunks.
TUNING = Tuning(whole_file_max=6 * MiB, chunk_size=1 * MiB, readahead_chunks=2)
#: moto's smallest part (S3's too).
PART = 5 * MiB


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


@pytest.fixture
def plain(s3_server):
    """A client that adds no checksums of its own: objects with nothing but their ETag."""
    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                        config=botocore.config.Config(request_checksum_calculation="when_required"))


class Stack:
    """The worker's cache over one store directory; ``restart`` opens it again, as a new process."""

    def __init__(self, uri: str, endpoint: str, root: Path, tuning: Tuning = TUNING,
                 client: str = "lean") -> None:
        self.uri, self.root, self.tuning, self.client = uri, root, tuning, client
        self.open(endpoint)

    def open(self, endpoint: str) -> None:
        self.source = S3Source(self.uri, S3Options(endpoint_url=endpoint, max_attempts=3,
                                                           client=self.client))
        self.store = ChunkStore(self.root, 1 << 30)
        self.counters = Counters()
        self.cache = DatasetCache(self.source, self.store, self.counters, self.tuning)
        self.objects = {o.key: o for o in self.source.list()}

    def restart(self, endpoint: str) -> None:
        self.cache.close()
        self.store.close()
        self.source.close()
        self.open(endpoint)

    def read(self, key: str, step: int = 256 * KiB) -> bytes:
        """The object as a sequential reader gets it, ``step`` bytes per read."""
        state = ReadState(self.objects[key])
        size = state.obj.size
        return b"".join(self.cache.read(state, offset, step) for offset in range(0, size, step))

    def read_at(self, key: str, offset: int, size: int) -> bytes:
        return self.cache.read(ReadState(self.objects[key]), offset, size)


def put_multipart(client, bucket: str, key: str, body: bytes, part: int = PART, **create) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, **create)["UploadId"]
    algorithm = create.get("ChecksumAlgorithm")
    parts = []
    for number, at in enumerate(range(0, len(body), part), start=1):
        extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
        answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                    Body=body[at : at + part], **extra)
        entry = {"PartNumber": number, "ETag": answer["ETag"]}
        if algorithm:
            entry[f"Checksum{algorithm}"] = answer[f"Checksum{algorithm}"]
        parts.append(entry)
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})


def _objects(client, plain, bucket, *only: str) -> dict[str, bytes]:
    """key -> body of every kind of object (or those named), uploaded under ``ds/``."""
    sizes = {
        "small.bin": 300 * KiB,  # single part: the MD5 ETag (checked before too)
        "large.bin": 6 * MiB + 5,  # single part, in 7 chunks: MD5 of the whole
        "multipart-small.bin": PART + 700 * KiB,  # 2 parts, fetched whole: the multipart ETag
        "multipart-large.bin": 2 * PART + 123 * KiB,  # 3 parts in 11 chunks: the multipart ETag
        "crc32-multipart.bin": PART + 2 * MiB,  # FULL_OBJECT CRC32, in 7 chunks
        "kms-sha256.bin": 200 * KiB,  # SSE-KMS: no MD5 ETag, a SHA-256 checksum
        "kms-composite.bin": 2 * PART + 1,  # SSE-KMS multipart: a COMPOSITE CRC32 checksum
    }
    files = {key: os.urandom(size) for key, size in sizes.items() if not only or key in only}
    upload = {
        "small.bin": lambda body: plain.put_object(Bucket=bucket, Key="ds/small.bin", Body=body),
        "large.bin": lambda body: plain.put_object(Bucket=bucket, Key="ds/large.bin", Body=body),
        "multipart-small.bin": lambda body: put_multipart(plain, bucket, "ds/multipart-small.bin", body),
        "multipart-large.bin": lambda body: put_multipart(plain, bucket, "ds/multipart-large.bin", body),
        "crc32-multipart.bin": lambda body: put_multipart(
            client, bucket, "ds/crc32-multipart.bin", body, ChecksumAlgorithm="CRC32",
            ChecksumType="FULL_OBJECT"),
        "kms-sha256.bin": lambda body: client.put_object(
            Bucket=bucket, Key="ds/kms-sha256.bin", Body=body, ServerSideEncryption="aws:kms",
            ChecksumAlgorithm="SHA256"),
        "kms-composite.bin": lambda body: put_multipart(
            client, bucket, "ds/kms-composite.bin", body, ServerSideEncryption="aws:kms",
            ChecksumAlgorithm="CRC32", ChecksumType="COMPOSITE"),
    }
    for key, body in files.items():
        upload[key](body)
    return files


KEYS = ["small.bin", "large.bin", "multipart-small.bin", "multipart-large.bin",
        "crc32-multipart.bin", "kms-sha256.bin", "kms-composite.bin"]


@pytest.mark.parametrize("key", KEYS)
def test_a_corrupted_body_is_refetched_never_served_never_kept(s3, plain, bucket, proxy, tmp_path, key):
    _corrupted_body_is_refetched(s3, plain, bucket, proxy, tmp_path, key)


@pytest.mark.parametrize("key", ["small.bin", "kms-sha256.bin", "crc32-multipart.bin", "multipart-large.bin"])
def test_the_same_through_botocore(s3, plain, bucket, proxy, tmp_path, key):
    """``DATAHOARD_S3_CLIENT=botocore``: botocore checks the checksum of a whole GET itself."""
    _corrupted_body_is_refetched(s3, plain, bucket, proxy, tmp_path, key, client="botocore")


def _corrupted_body_is_refetched(s3, plain, bucket, proxy, tmp_path, key, client="lean"):
    files = _objects(s3, plain, bucket, key)
    body = files[key]
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache", client=client)
    # Twice: 8 bytes flipped in the middle of whichever GETs of this object come first.
    proxy.add(Fault(path_contains=key, flip=8, flip_at=100 * KiB + 3, times=2))
    assert stack.read(key) == body
    assert proxy.injected == 2
    assert stack.counters.integrity_mismatches >= 1
    assert stack.counters.unverified_objects == 0

    # The proxy is gone, the worker restarts: what the cache holds is the right bytes, served
    # from the cache alone.
    stack.restart(proxy.endpoint)
    proxy.add(Fault(status=500, path_contains=key, times=1000))  # any fetch now fails
    assert stack.read(key) == body
    assert stack.read_at(key, len(body) - 4096, 4096) == body[-4096:]
    assert stack.counters.fetched == 0


@pytest.mark.parametrize("key", ["large.bin", "multipart-large.bin", "multipart-small.bin"])
def test_persistent_corruption_is_an_error_and_nothing_is_cached(s3, plain, bucket, proxy, tmp_path, key):
    files = _objects(s3, plain, bucket, key)
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache")
    proxy.add(Fault(path_contains=key, flip=8, flip_at=4096, times=10_000))
    with pytest.raises(SourceError, match="checksum mismatch"):
        stack.read_at(key, len(files[key]) // 2, 4096)  # a random read of one chunk
    proxy.faults.clear()
    stack.restart(proxy.endpoint)
    # Nothing wrong stayed behind: with the proxy gone the right bytes come from the store.
    assert stack.read(key) == files[key]
    assert stack.counters.fetched == len(files[key])


def test_a_random_read_of_a_large_object_is_checked_whole_first(s3, plain, bucket, proxy, tmp_path):
    """The first read of one chunk fetches and checks the whole object before answering."""
    files = _objects(s3, plain, bucket, "multipart-large.bin")
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache")
    body = files["multipart-large.bin"]
    proxy.add(Fault(path_contains="multipart-large.bin", flip=8, flip_at=0, times=1))
    assert stack.read_at("multipart-large.bin", 7 * MiB + 11, 5000) == body[7 * MiB + 11 : 7 * MiB + 5011]
    assert stack.counters.fetched >= len(body)
    assert stack.cache.is_cached(stack.objects["multipart-large.bin"])


def test_an_object_too_large_to_check_first_is_counted_and_dropped_when_wrong(s3, plain, bucket, proxy, tmp_path):
    """Above ``check_whole_max`` chunks are served as they come (counted as unverified) and the
    object is checked once complete: a mismatch drops all of it, so nothing wrong is kept."""
    files = _objects(s3, plain, bucket, "large.bin")
    body = files["large.bin"]
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache",
                  Tuning(whole_file_max=1 * MiB, chunk_size=1 * MiB, check_whole_max=2 * MiB))
    proxy.add(Fault(path_contains="large.bin", flip=8, flip_at=1000, times=1))
    stack.read("large.bin")  # may be wrong: that is this mode's documented limit
    assert stack.counters.unverified_objects == 1
    obj = stack.objects["large.bin"]
    deadline = time.monotonic() + 60
    while stack.counters.integrity_mismatches == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.counters.integrity_mismatches == 1
    assert not any(stack.store.contains(c) for c in stack.cache.chunks(obj))
    assert stack.read("large.bin") == body  # fetched again, checked again once complete
    stack.restart(proxy.endpoint)
    proxy.add(Fault(status=500, path_contains="large.bin", times=1000))
    assert stack.read("large.bin") == body and stack.counters.fetched == 0


def test_an_object_nothing_vouches_for_is_counted(s3, bucket, proxy, tmp_path, plain):
    """SSE-KMS, no additional checksum: nothing to check against; served, and counted."""
    body = os.urandom(100 * KiB)
    plain.put_object(Bucket=bucket, Key="ds/kms.bin", Body=body, ServerSideEncryption="aws:kms")
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache")
    assert stack.read("kms.bin") == body
    assert stack.read("kms.bin") == body
    assert stack.counters.unverified_objects == 1


def test_mount_never_serves_corrupt_bytes_of_a_large_object(s3, plain, bucket, mount_dataset, proxy):
    """The issue's case through a real FUSE mount with the default 8 MiB chunks: a multipart
    object (ETag not an MD5) and a single-part object larger than one chunk."""
    files = {"shard.tar": os.urandom(18 * MiB), "big.bin": os.urandom(9 * MiB)}
    put_multipart(plain, bucket, "ds/shard.tar", files["shard.tar"], part=8 * MiB)
    plain.put_object(Bucket=bucket, Key="ds/big.bin", Body=files["big.bin"])
    m = mount_dataset(bucket, "ds", endpoint=proxy.endpoint)
    for key, body in files.items():
        proxy.add(Fault(path_contains=key, flip=8, flip_at=3 * MiB, times=1))
        assert (m.mountpoint / key).read_bytes() == body
    stats = m.stats()
    assert stats.integrity_mismatches >= 2 and stats.unverified_objects == 0
    status = datahoard("status", str(m.mountpoint)).stdout
    assert "0 objects served unchecked" in status and "corrupt fetches dropped" in status
    metrics = urllib.request.urlopen(runtime.lookup(m.mountpoint).stats_url + "/metrics").read().decode()
    mismatches = [line for line in metrics.splitlines() if line.startswith("datahoard_integrity_mismatches_total")]
    assert mismatches and float(mismatches[0].split()[-1]) == stats.integrity_mismatches
    assert any(line.startswith("datahoard_unverified_objects") and line.endswith(" 0.0") for line in metrics.splitlines())


def _backing_bytes(stack: Stack, key: str) -> bytes | None:
    fd = stack.cache.backing_fd(stack.objects[key])
    if fd is None:
        return None
    try:
        return os.pread(fd, stack.objects[key].size + 1, 0)
    finally:
        os.close(fd)


def test_a_backing_file_is_handed_out_only_for_an_object_the_store_vouched_for(s3, plain, bucket, proxy, tmp_path):
    """Passthrough (``DatasetCache.backing_fd``) never hands the kernel bytes nothing checked:
    an object up to ``check_whole_max`` is checked whole before it is cached, so it passes
    through once whole; a larger one only once its background check matched, recorded so a
    new process passes it through at once; a wrong one is never passed through."""
    files = _objects(s3, plain, bucket, "large.bin", "small.bin")
    stack = Stack(f"s3://{bucket}/ds", proxy.endpoint, tmp_path / "cache",
                  Tuning(whole_file_max=1 * MiB, chunk_size=1 * MiB, check_whole_max=2 * MiB))
    assert _backing_bytes(stack, "small.bin") is None  # not cached
    assert stack.read("small.bin") == files["small.bin"]
    assert _backing_bytes(stack, "small.bin") == files["small.bin"]
    proxy.add(Fault(path_contains="large.bin", flip=8, flip_at=1000, times=1))
    stack.read("large.bin")  # served as it arrives; wrong in one chunk
    deadline = time.monotonic() + 60
    while stack.counters.integrity_mismatches == 0 and time.monotonic() < deadline:
        assert _backing_bytes(stack, "large.bin") is None  # never before the check
        time.sleep(0.05)
    assert stack.counters.integrity_mismatches == 1 and _backing_bytes(stack, "large.bin") is None
    assert stack.read("large.bin") == files["large.bin"]  # fetched again; the check runs once complete
    deadline = time.monotonic() + 60
    while _backing_bytes(stack, "large.bin") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _backing_bytes(stack, "large.bin") == files["large.bin"]
    stack.restart(proxy.endpoint)
    proxy.add(Fault(status=500, path_contains="large.bin", times=1000))
    assert _backing_bytes(stack, "large.bin") == files["large.bin"]  # the match was recorded
    assert stack.counters.fetched == 0
