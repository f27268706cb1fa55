"""The Source contract, run against the in-memory fake and against S3Source on a real S3
server over HTTP (moto): whatever the fake promises the unit tests, the real source does too.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from datahoard.cache_worker.integrity import verify
from datahoard.cache_worker.s3 import S3Options, S3Source
from datahoard.cache_worker.source import (ChecksumMismatch, RemoteObject, Source, SourceChanged,
                                           SourceNotFound, SourceTransientError, SourceUnreachable)
from tests.support.fakes.source import ENDPOINT as fake_endpoint, FakeS3, FakeSource
from tests.support.faults import Fault, FaultProxy
from tests.support.ports import free_port

MiB = 1 << 20


@dataclass
class World:
    """One store as a test sees it: write objects into it, read them through a Source, and
    break the way between them (a proxy that answers 503 or flips bytes of a body)."""

    bucket: str
    put: Callable[..., None]  # put(key, data, part_size=None)
    delete: Callable[[str], None]
    source: Callable[[str], Source]  # source(uri), 2 attempts per request
    fail_next: Callable[[str, int], None]  # fail_next(key, times): 503 SlowDown
    #: unreachable(uri) -> a Source whose endpoint refuses connections, and the endpoint's name.
    unreachable: Callable[[str], tuple[Source, str]]
    corrupt_next: Callable[[str, int], None]  # corrupt_next(key, times): one byte flipped


def _fake_world() -> World:
    store = FakeS3()
    bucket = "contract"
    store.create_bucket(bucket)
    return World(bucket,
                 put=lambda key, data, part_size=None: store.put(bucket, key, data, part_size),
                 delete=lambda key: store.delete(bucket, key),
                 source=lambda uri: FakeSource(store, uri, max_attempts=2),
                 fail_next=lambda key, times: store.fail_next(bucket, key, times),
                 corrupt_next=lambda key, times: store.corrupt_next(bucket, key, times),
                 unreachable=lambda uri: (FakeSource(FakeS3(reachable=False), uri, max_attempts=2),
                                          fake_endpoint))


def _s3_world(request: pytest.FixtureRequest) -> World:
    server = request.getfixturevalue("s3_server")
    client = server.client()
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    def put(key: str, data: bytes, part_size: int | None = None) -> None:
        if part_size is None:
            client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        for number, at in enumerate(range(0, len(data), part_size), start=1):
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                      Body=data[at : at + part_size])["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                         MultipartUpload={"Parts": parts})

    proxy = FaultProxy(server.endpoint)  # GETs go through it; its HEADs lack Content-Length
    request.addfinalizer(proxy.close)

    class ThroughProxy(S3Source):
        def __init__(self, uri: str) -> None:
            super().__init__(uri, S3Options(endpoint_url=server.endpoint, max_attempts=2))
            self._reader = S3Source(uri, S3Options(endpoint_url=proxy.endpoint, max_attempts=2))

        def fetch(self, obj, start, length):
            self._reader.on_mismatch = self.on_mismatch
            return self._reader.fetch(obj, start, length)

        def read(self, obj, start, length):
            return self.fetch(obj, start, length).data

    return World(bucket, put=put, delete=lambda key: client.delete_object(Bucket=bucket, Key=key),
                 source=ThroughProxy,
                 fail_next=lambda key, times: proxy.add(Fault(status=503, s3_code="SlowDown",
                                                              path_contains=key, times=times)),
                 corrupt_next=lambda key, times: proxy.add(Fault(flip=1, path_contains=key, times=times)),
                 unreachable=closed_endpoint)


def closed_endpoint(uri: str) -> tuple[Source, str]:
    endpoint = f"http://127.0.0.1:{free_port()}"
    return S3Source(uri, S3Options(endpoint_url=endpoint, max_attempts=2)), endpoint


@pytest.fixture(params=["fake", pytest.param("s3", marks=pytest.mark.integration)])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    yield _fake_world() if request.param == "fake" else _s3_world(request)


def test_listing_is_scoped_to_the_prefix_as_a_directory(world):
    world.put("train/a.bin", b"aaaa")
    world.put("train/sub/b.bin", b"bb")
    world.put("train2/outside", b"x")
    world.put("top", b"x")
    listed = sorted(world.source(f"s3://{world.bucket}/train").list(), key=lambda o: o.key)
    assert [(o.key, o.size) for o in listed] == [("a.bin", 4), ("sub/b.bin", 2)]
    assert listed[0].etag == hashlib.md5(b"aaaa").hexdigest()
    assert listed[0].mtime > 0


def test_a_missing_bucket_or_object_is_not_found(world):
    with pytest.raises(SourceNotFound, match="bucket does not exist: s3://no-such-bucket-x/"):
        list(world.source("s3://no-such-bucket-x/p").list())
    with pytest.raises(SourceNotFound, match=f"not found: s3://{world.bucket}/gone"):
        world.source(f"s3://{world.bucket}/").stat("gone")


def test_stat_and_ranged_reads_return_exact_bytes(world):
    data = bytes(range(256)) * 40
    world.put("p/obj", data)
    src = world.source(f"s3://{world.bucket}/p/")
    obj = src.stat("obj")
    assert (obj.key, obj.size, obj.etag) == ("obj", len(data), hashlib.md5(data).hexdigest())
    assert src.read(obj, 100, 1000) == data[100:1100]
    assert src.read(obj, len(data) - 7, 7) == data[-7:]
    assert src.read(obj, 5, 0) == b""


def test_only_a_whole_read_of_an_md5_object_is_verified_in_band(world):
    data = b"0123456789" * 100
    world.put("obj", data)
    src = world.source(f"s3://{world.bucket}/")
    obj = src.stat("obj")
    whole, part = src.fetch(obj, 0, obj.size), src.fetch(obj, 10, 20)
    assert (whole.data, whole.verified) == (data, True)
    assert (part.data, part.verified) == (data[10:30], False)


@pytest.mark.parametrize("whole", [True, False])
def test_a_read_is_pinned_to_the_listed_version(world, whole):
    world.put("obj", b"version one")
    src = world.source(f"s3://{world.bucket}/")
    listed = src.stat("obj")
    world.put("obj", b"version two")
    start, length = (0, listed.size) if whole else (2, 5)
    with pytest.raises(SourceChanged, match=f"s3://{world.bucket}/obj changed since it was listed"):
        src.read(listed, start, length)
    with pytest.raises(SourceChanged):
        src.evidence(listed)


def test_an_object_deleted_after_listing_is_not_found(world):
    world.put("obj", b"here for now")
    src = world.source(f"s3://{world.bucket}/")
    listed = src.stat("obj")
    world.delete("obj")
    with pytest.raises(SourceNotFound, match=f"not found: s3://{world.bucket}/obj"):
        src.read(listed, 0, 4)


def test_evidence_of_a_single_put_is_its_md5(world):
    world.put("obj", b"payload")
    src = world.source(f"s3://{world.bucket}/")
    check = src.evidence(src.stat("obj")).check
    assert check is not None
    assert (check.kind, check.expected) == ("md5", hashlib.md5(b"payload").hexdigest())


def test_evidence_of_a_multipart_object_is_its_part_layout(world):
    part = 5 * MiB  # S3's smallest part but the last
    data = (b"abcdefgh" * (part // 8)) + b"tail" * 1000
    world.put("big", data, part_size=part)
    src = world.source(f"s3://{world.bucket}/")
    obj = src.stat("big")
    assert obj.etag.endswith("-2")
    guessed = src.evidence(obj).check
    exact = src.evidence(obj, exact=True).check
    assert guessed is not None and exact is not None
    assert (guessed.kind, guessed.expected, guessed.parts, guessed.guessed) == (
        "md5-parts", obj.etag, (part, len(data) - part), True)
    assert (exact.parts, exact.guessed) == ((part, len(data) - part), False)
    assert verify(guessed, obj.size, iter((data,)))
    assert not verify(guessed, obj.size, iter((b"X" + data[1:],)))
    # A range of a multipart object is never verified in-band either.
    assert src.fetch(obj, 0, obj.size).verified is False


def test_a_made_up_object_is_not_found(world):
    src = world.source(f"s3://{world.bucket}/")
    with pytest.raises(SourceNotFound):
        src.read(RemoteObject(key="gone", size=10, etag="0" * 32, mtime=0.0), 0, 10)


def test_a_transient_failure_is_retried_and_one_that_persists_names_the_object(world):
    data = b"retry me" * 100
    world.put("obj", data)
    src = world.source(f"s3://{world.bucket}/")
    obj = src.stat("obj")
    world.fail_next("obj", 1)
    assert src.read(obj, 0, obj.size) == data
    world.fail_next("obj", 2)
    with pytest.raises(SourceTransientError, match=f"s3://{world.bucket}/obj: SlowDown"):
        src.read(obj, 10, 20)


def test_a_whole_read_corrupted_in_transit_is_caught_reported_and_retried(world):
    data = bytes(range(256)) * 8
    world.put("obj", data)
    src = world.source(f"s3://{world.bucket}/")
    seen: list[str] = []
    src.on_mismatch = seen.append
    obj = src.stat("obj")
    world.corrupt_next("obj", 1)
    assert src.fetch(obj, 0, obj.size) == src.fetch(obj, 0, obj.size)  # right, both times
    assert src.read(obj, 0, obj.size) == data
    assert len(seen) == 1 and "checksum mismatch" in seen[0]
    world.corrupt_next("obj", 2)
    with pytest.raises(ChecksumMismatch, match=f"checksum mismatch reading s3://{world.bucket}/obj"):
        src.read(obj, 0, obj.size)


def test_a_range_corrupted_in_transit_arrives_as_it_is_unverified(world):
    """S3 sends no checksum for a range: the cache must check such bytes itself."""
    data = bytes(range(256)) * 8
    world.put("obj", data)
    src = world.source(f"s3://{world.bucket}/")
    obj = src.stat("obj")
    world.corrupt_next("obj", 1)
    got = src.fetch(obj, 100, 50)
    assert got.verified is False and len(got.data) == 50 and got.data != data[100:150]


def test_an_unreachable_endpoint_is_named_in_every_call(world):
    src, endpoint = world.unreachable("s3://b/p")
    obj = RemoteObject(key="k", size=10, etag="", mtime=0.0)
    with pytest.raises(SourceUnreachable, match=f"cannot reach S3 endpoint {endpoint}"):
        list(src.list())
    with pytest.raises(SourceUnreachable, match=f"cannot reach S3 endpoint {endpoint} for s3://b/p/k"):
        src.read(obj, 0, 10)
