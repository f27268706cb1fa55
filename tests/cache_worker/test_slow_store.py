"""A slow store never freezes the worker: every source request has a total deadline, reads that
wait on the source are bounded, and metadata and cache hits never wait behind fetches.

Real parts throughout: the S3 server (moto over HTTP) behind the fault proxy, real FUSE mounts
through ``datahoard mount``. Reads run in child processes (``read_or_hang``) so that a missing
bound fails the test after a generous limit instead of hanging it; every fault lasts far longer
than those limits.
"""

from __future__ import annotations

import os
import time

import pytest

from datahoard.cache_worker.s3 import S3Options, S3Source
from datahoard.cache_worker.source import RemoteObject, SourceTransientError
from tests.faults import Fault, FaultProxy

pytestmark = pytest.mark.integration

#: A store that sends one byte a second: no single recv ever waits long, so only a total
#: deadline per request ends it.
_DRIP = 1.0


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


def _source(proxy: FaultProxy, uri: str, **opts) -> S3Source:
    return S3Source(uri, S3Options(endpoint_url=proxy.endpoint, max_attempts=2, read_timeout=5,
                                   request_timeout=2, **opts))


@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_a_dripping_chunk_get_ends_within_its_deadline(s3, bucket, proxy, monkeypatch, client):
    if client == "botocore":
        monkeypatch.setenv("DATAHOARD_S3_CLIENT", "botocore")
    body = os.urandom(20_000)
    s3.put_object(Bucket=bucket, Key="ds/drip.bin", Body=body)
    etag = s3.head_object(Bucket=bucket, Key="ds/drip.bin")["ETag"].strip('"')
    src = _source(proxy, f"s3://{bucket}/ds")
    obj = RemoteObject("drip.bin", len(body), etag, 0.0)
    proxy.add(Fault(drip_rate=_DRIP, path_contains="drip.bin", times=100))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"s3://.*/ds/drip\.bin.*timed out"):
        src.read(obj, 0, len(body))
    # Two attempts of 2 s and a backoff; per-recv timeouts alone would take 20,000 s.
    assert time.monotonic() - started < 15
    proxy.faults.clear()
    assert src.read(obj, 0, len(body)) == body  # the cut connections left nothing behind


def test_a_dripping_listing_page_ends_within_its_deadline(s3, bucket, proxy):
    s3.put_object(Bucket=bucket, Key="ds/a", Body=b"x")
    src = _source(proxy, f"s3://{bucket}/ds")
    proxy.add(Fault(drip_rate=_DRIP, path_contains="list-type", times=100))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"listing s3://.*/ds/ timed out"):
        list(src.list())
    assert time.monotonic() - started < 20
    proxy.faults.clear()
    assert [o.key for o in src.list()] == ["a"]
