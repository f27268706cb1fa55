"""Fixtures for the HDFS source tests: one real single-node HDFS per session
(tests/support/hdfs.py), filled once with the test data of data.py, and HDFS mounts.

It starts in a few seconds. Only a machine without Java skips these tests; a failing fetch or
start is an error, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hdfs import JAVA_MISSING, HdfsCluster, WebHdfsClient, start_cluster, stop_cluster
from tests.support.mounts import Mount, Mounts

from .data import OWNER, many_files, sample_files


@pytest.fixture(scope="session")
def hdfs_cluster(tmp_path_factory) -> Iterator[HdfsCluster]:
    if JAVA_MISSING:
        pytest.skip(f"HDFS tests: {JAVA_MISSING}")
    cluster = start_cluster(tmp_path_factory.mktemp("hdfs"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster.process)


@pytest.fixture(scope="session")
def webhdfs(hdfs_cluster: HdfsCluster) -> WebHdfsClient:
    return WebHdfsClient(hdfs_cluster)


@pytest.fixture(scope="session")
def dataset(webhdfs: WebHdfsClient) -> dict[str, dict[str, bytes]]:
    """/ds (mixed files), /many (a hundred files and a subdirectory), and alice's data:
    /shared (755) with secret.bin (600) beside a readable readme.txt, /closed (700)."""
    files = {"ds": sample_files(), "many": many_files()}
    for root, tree in files.items():
        webhdfs.mkdirs(f"/{root}")
        webhdfs.put_many({f"/{root}/{key}": data for key, data in tree.items()})
    webhdfs.put("/shared/secret.bin", b"alice only", permission="600")
    webhdfs.put("/shared/readme.txt", b"for everyone")
    webhdfs.put("/closed/inside.txt", b"x")
    webhdfs.chmod("/closed", "700")
    for path in ("/shared", "/shared/secret.bin", "/closed"):
        webhdfs.chown(path, OWNER)
    return files


HdfsMount = Mount


@pytest.fixture
def mount_hdfs(tmp_path: Path) -> Iterator[Callable[..., HdfsMount]]:
    """``datahoard mount hdfs://...`` as a user would; unmounts whatever is left after."""
    mounts = Mounts(tmp_path)
    yield mounts.mount
    mounts.cleanup()
