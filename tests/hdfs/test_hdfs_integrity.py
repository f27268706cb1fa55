"""HDFS bytes corrupted on their way from the DataNode are never served and never cached.

The real minicluster, with a fault proxy in front of the NameNode that sends its redirects
through a second proxy in front of the DataNode; that one flips 8 bytes of OPEN bodies and
delivers them with success. The cache checks every object against ``GETFILECHECKSUM``
(MD5-of-MD5-of-CRC32C over 1 MiB blocks here) before serving it, so the reader gets the right
bytes or an error, and after the proxies are gone and a restart the cache holds the right bytes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import urllib3

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache, ReadState
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.hdfs import HdfsOptions, HdfsSource
from datahoard.cache_worker.integrity import verify
from datahoard.cache_worker.source import SourceError
from datahoard.cache_worker.store import ChunkStore
from tests.support.faults import Fault, FaultProxy
from tests.support.hdfs import BLOCK_SIZE, HdfsCluster

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
#: Chunks of 768 KiB: not aligned with the 1 MiB blocks, so checks cross chunk boundaries.
TUNING = Tuning(whole_file_max=2 * MiB, chunk_size=768 * KiB, readahead_chunks=2)
FILES = {
    "small.bin": 300 * KiB,  # one block, one chunk
    "blocks.bin": BLOCK_SIZE + 700 * KiB + 3,  # two blocks, fetched whole (one chunk)
    "large.bin": 2 * BLOCK_SIZE + 1000,  # three blocks (Hadoop pads their MD5s), three chunks
    "four.bin": 4 * BLOCK_SIZE,  # four full blocks
    "many.bin": 20 * BLOCK_SIZE + 12345,  # 21 blocks: Hadoop's buffer of block MD5s doubled 4 times
    "odd.bin": 5 * KiB + 77,  # smaller than a CRC chunk multiple
}


@pytest.fixture
def files(webhdfs, hdfs_cluster) -> tuple[str, dict[str, bytes]]:
    root = f"/integrity-{uuid.uuid4().hex[:8]}"
    webhdfs.mkdirs(root)
    bodies = {key: os.urandom(size) for key, size in FILES.items()}
    webhdfs.put_many({f"{root}/{key}": body for key, body in bodies.items()})
    return root, bodies


@pytest.fixture
def proxies(hdfs_cluster: HdfsCluster, files):
    """(NameNode proxy, DataNode proxy): the NameNode's redirects lead through the second."""
    root, _ = files
    http = urllib3.PoolManager(retries=False)
    probe = http.request("GET", f"http://{hdfs_cluster.http}/webhdfs/v1{root}/small.bin",
                         fields={"op": "OPEN", "user.name": hdfs_cluster.superuser}, redirect=False,
                         preload_content=False)
    datanode = urllib3.util.parse_url(probe.headers["Location"]).netloc
    probe.release_conn()
    namenode_proxy = FaultProxy(f"http://{hdfs_cluster.http}")
    datanode_proxy = FaultProxy(f"http://{datanode}")
    namenode_proxy.redirects[datanode] = datanode_proxy.endpoint.removeprefix("http://")
    yield namenode_proxy, datanode_proxy
    namenode_proxy.close()
    datanode_proxy.close()


class Stack:
    def __init__(self, uri: str, user: str, root: Path) -> None:
        self.uri, self.user, self.root = uri, user, root
        self.open()

    def open(self) -> None:
        self.source = HdfsSource(self.uri, HdfsOptions(user=self.user, max_attempts=3))
        self.store = ChunkStore(self.root, 1 << 30)
        self.counters = Counters()
        self.cache = DatasetCache(self.source, self.store, self.counters, TUNING)
        self.objects = {o.key: o for o in self.source.list()}

    def restart(self) -> None:
        self.cache.close()
        self.store.close()
        self.source.close()
        self.open()

    def read(self, key: str, step: int = 256 * KiB) -> bytes:
        state = ReadState(self.objects[key])
        return b"".join(self.cache.read(state, at, step) for at in range(0, state.obj.size, step))


def test_getfilechecksum_is_recomputed_from_the_bytes(hdfs_cluster, files):
    """The MD5-of-MD5-of-CRC32C recomputation agrees with the DataNode's for every layout."""
    root, bodies = files
    source = HdfsSource(hdfs_cluster.uri(root), HdfsOptions(user=hdfs_cluster.superuser))
    for obj in source.list():
        evidence = source.evidence(obj)
        assert evidence.check is not None, evidence.reason
        assert evidence.check.kind == "hdfs-md5md5crc32c" and evidence.check.block_size == BLOCK_SIZE
        body = bodies[obj.key]
        assert verify(evidence.check, obj.size, [body[i : i + 100_000] for i in range(0, len(body), 100_000)])
        wrong = bytearray(body)
        wrong[len(body) // 2] ^= 1
        assert not verify(evidence.check, obj.size, [bytes(wrong)])


@pytest.mark.parametrize("key", ["small.bin", "blocks.bin", "large.bin"])
def test_a_corrupted_body_is_refetched_never_served_never_kept(hdfs_cluster, files, proxies, tmp_path, key):
    root, bodies = files
    namenode_proxy, datanode_proxy = proxies
    uri = f"hdfs://{namenode_proxy.endpoint.removeprefix('http://')}{root}"
    stack = Stack(uri, hdfs_cluster.superuser, tmp_path / "cache")
    datanode_proxy.add(Fault(path_contains=f"{key}?op=OPEN", flip=8, flip_at=100 * KiB + 1, times=2))
    assert stack.read(key) == bodies[key]
    assert datanode_proxy.injected == 2
    assert stack.counters.integrity_mismatches >= 1 and stack.counters.unverified_objects == 0

    stack.restart()
    datanode_proxy.add(Fault(status=500, path_contains=f"{key}?op=OPEN", times=1000))
    assert stack.read(key) == bodies[key]
    assert stack.counters.fetched == 0


def test_persistent_corruption_is_an_error_and_nothing_is_cached(hdfs_cluster, files, proxies, tmp_path):
    root, bodies = files
    namenode_proxy, datanode_proxy = proxies
    uri = f"hdfs://{namenode_proxy.endpoint.removeprefix('http://')}{root}"
    stack = Stack(uri, hdfs_cluster.superuser, tmp_path / "cache")
    datanode_proxy.add(Fault(path_contains="large.bin?op=OPEN", flip=8, flip_at=10, times=10_000))
    with pytest.raises(SourceError, match="checksum mismatch"):
        stack.cache.read(ReadState(stack.objects["large.bin"]), 2 * MiB, 4096)
    datanode_proxy.faults.clear()
    stack.restart()
    assert stack.read("large.bin") == bodies["large.bin"]
    assert stack.counters.fetched == len(bodies["large.bin"])
