"""A NameNode that drips its answers is cut off by the total deadline of each WebHDFS attempt
(``DATAHOARD_HDFS_REQUEST_TIMEOUT``): per-recv timeouts alone would wait for days."""

from __future__ import annotations

import time

import pytest

from datahoard.cache_worker.hdfs import HdfsOptions, HdfsSource
from datahoard.cache_worker.source import SourceTransientError
from tests.support.faults import Fault, FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(hdfs_cluster):
    p = FaultProxy(f"http://{hdfs_cluster.http}")
    yield p
    p.close()


def _source(proxy, hdfs_cluster, path: str) -> HdfsSource:
    return HdfsSource(f"hdfs://{proxy.endpoint.removeprefix('http://')}{path}",
                      HdfsOptions(user=hdfs_cluster.superuser, max_attempts=2, read_timeout=5,
                                  request_timeout=2))


def test_a_dripping_listing_ends_within_its_deadline(hdfs_cluster, dataset, proxy):
    source = _source(proxy, hdfs_cluster, "/ds")
    proxy.add(Fault(drip_rate=1.0, path_contains="op=LISTSTATUS", times=1000))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"LISTSTATUS_BATCH of hdfs://.*/ds.* timed out"):
        list(source.list())
    assert time.monotonic() - started < 20  # two attempts of 2 s and a backoff
    proxy.faults.clear()
    assert {o.key for o in source.list()} == set(dataset["ds"])


def test_a_read_whose_version_check_drips_ends_within_its_deadline(hdfs_cluster, dataset, proxy):
    source = _source(proxy, hdfs_cluster, "/ds")
    obj = source.stat("class0/img2.jpg")
    proxy.add(Fault(drip_rate=1.0, path_contains="op=GETFILESTATUS", times=1000))
    started = time.monotonic()
    with pytest.raises(SourceTransientError, match=r"GETFILESTATUS of hdfs://.*img2\.jpg.* timed out"):
        source.read(obj, 0, 100)
    assert time.monotonic() - started < 40
    proxy.faults.clear()
    assert source.read(obj, 0, 100) == dataset["ds"]["class0/img2.jpg"][:100]
