"""HdfsSource against a real NameNode and DataNode (WebHDFS), and its URI/option parsing."""

from __future__ import annotations

import json
import logging
import random
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from datahoard.cache_worker.hdfs import HdfsOptions, HdfsSource
from datahoard.cache_worker.hdfs_uri import DEFAULT_HTTP_PORT, parse_hdfs_uri
from datahoard.cache_worker.webhdfs import _classify
from datahoard.cache_worker.source import (
    RemoteObject,
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)
from datahoard.cache_worker.settings import SourceSettings
from datahoard.cache_worker.sources import hdfs_options, open_source
from tests.support.faults import Fault, FaultProxy
from tests.support.hdfs import BLOCK_SIZE, LS_LIMIT, HdfsCluster
from tests.support.ports import free_port

from .data import MANY_SUB, MANY_TOP, OTHER, OWNER


# -- parsing (no cluster) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "scheme", "namenodes", "path"),
    [
        ("hdfs://nn/data/train/", "http", ("nn:9870",), "/data/train"),
        ("hdfs://nn.example.com:50070/data", "http", ("nn.example.com:50070",), "/data"),
        ("webhdfs://nn:9870/", "http", ("nn:9870",), "/"),
        ("webhdfs://nn", "http", ("nn:9870",), "/"),
        ("swebhdfs://nn/x", "https", ("nn:9871",), "/x"),
    ],
)
def test_parse_uri_default_http_port(uri, scheme, namenodes, path):
    parsed = parse_hdfs_uri(uri)
    assert (parsed.scheme, parsed.namenodes, parsed.path) == (scheme, namenodes, path)
    assert DEFAULT_HTTP_PORT == 9870


@pytest.mark.parametrize("uri", ["hdfs:///path", "s3://b/x", "hdfs://nn/x?op=OPEN",
                                 "hdfs://user@nn/x", "hdfs://nn:99999/x", "hdfs://n n/x"])
def test_parse_uri_rejects(uri):
    with pytest.raises(SourceError):
        parse_hdfs_uri(uri)


def test_options_from_env_ha_list_and_token():
    options = hdfs_options(SourceSettings.from_env({
        "DATAHOARD_HDFS_USER": "etl",
        "DATAHOARD_HDFS_NAMENODES": "nn1:9870, nn2:9870",
        "DATAHOARD_HDFS_DELEGATION_TOKEN": "tok",
        "DATAHOARD_HDFS_MAX_ATTEMPTS": "2",
    }))
    assert options == HdfsOptions(user="etl", delegation_token="tok",
                                  namenodes=("nn1:9870", "nn2:9870"), max_attempts=2)
    parsed = parse_hdfs_uri("hdfs://mycluster/data", options.namenodes)
    assert parsed.authority == "mycluster" and parsed.namenodes == ("nn1:9870", "nn2:9870")


def test_open_source_picks_hdfs_and_refuses_s3_options():
    assert isinstance(open_source("webhdfs://nn:9870/x"), HdfsSource)
    with pytest.raises(SourceError, match="apply to s3://"):
        open_source("hdfs://nn/x", endpoint_url="http://minio:9000")


def remote(exception: str, message: str = "m") -> bytes:
    return json.dumps({"RemoteException": {"exception": exception, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (404, remote("FileNotFoundException"), SourceNotFound, "not found: hdfs://nn/x"),
        (403, remote("AccessControlException", "Permission denied: user=bob"),
         SourcePermissionDenied, "user=bob"),
        (401, b"<html>Authentication required</html>", SourceAuthError, "DELEGATION_TOKEN"),
        (403, remote("InvalidToken", "token (HDFS_DELEGATION_TOKEN ...) is expired"),
         SourceAuthError, "expired"),
        (403, remote("SecurityException", "Failed to obtain user group information"),
         SourceAuthError, "rejected the credentials"),
        (503, b"", SourceTransientError, "HTTP 503"),
        (403, remote("RetriableException", "NameNode still not started"),
         SourceTransientError, "still not started"),
        (500, remote("IOException", "DataNode down"), SourceTransientError, "DataNode down"),
        (404, b"It looks like you are making an HTTP request to a Hadoop IPC port.",
         SourceError, "RPC port"),
        (404, b"<html>Not Found</html>", SourceError, "no WebHDFS"),
        (400, remote("IllegalArgumentException", "Invalid value for webhdfs parameter"),
         SourceError, "Invalid value"),
    ],
)
def test_classify_webhdfs_errors(status, body, kind, text):
    error = _classify(status, body, "hdfs://nn/x", "http://nn:9870")
    assert type(error) is kind and text in str(error)


# -- stub NameNodes (standby, recording) --------------------------------------------------------
class StubNameNode:
    """Answers every WebHDFS call with one canned response and records the query strings."""

    def __init__(self, status: int, body: dict) -> None:
        self.queries: list[dict[str, list[str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                stub.queries.append(parse_qs(urlsplit(self.path).query))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


STANDBY = {"RemoteException": {
    "exception": "StandbyException", "javaClassName": "org.apache.hadoop.ipc.StandbyException",
    "message": "Operation category READ is not supported in state standby"}}
FILE_STATUS = {"FileStatus": {"type": "FILE", "length": 3, "modificationTime": 1000, "fileId": 5,
                              "pathSuffix": ""}}


@pytest.fixture
def standby():
    stub = StubNameNode(403, STANDBY)
    yield stub
    stub.close()


def test_delegation_token_replaces_user_name():
    stub = StubNameNode(200, FILE_STATUS)
    try:
        source = HdfsSource(f"hdfs://{stub.address}/d", HdfsOptions(user="etl", delegation_token="T0K"))
        assert source.stat("f").size == 3
        source = HdfsSource(f"hdfs://{stub.address}/d", HdfsOptions(user="etl"))
        source.stat("f")
    finally:
        stub.close()
    with_token, with_user = stub.queries
    assert with_token["delegation"] == ["T0K"] and "user.name" not in with_token
    assert with_user["user.name"] == ["etl"] and "delegation" not in with_user
    assert with_user["op"] == ["GETFILESTATUS"]


def test_delegation_token_stays_out_of_debug_logs():
    # A handler on urllib3's own logger: other tests may have changed propagation or levels.
    logger = logging.getLogger("urllib3.connectionpool")
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    stub = StubNameNode(200, FILE_STATUS)
    try:
        source = HdfsSource(f"hdfs://{stub.address}/d", HdfsOptions(delegation_token="S3CR3T"))
        source.stat("f")
    finally:
        stub.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert stub.queries[0]["delegation"] == ["S3CR3T"]
    text = "\n".join(records)
    assert "GETFILESTATUS" in text and "S3CR3T" not in text


def test_only_standby_namenodes_is_unreachable(standby):
    source = HdfsSource("hdfs://ns/", HdfsOptions(namenodes=(standby.address,), max_attempts=2))
    with pytest.raises(SourceUnreachable, match="no active NameNode"):
        source.stat("x")


RETRIABLE = {"RemoteException": {
    "exception": "RetriableException", "javaClassName": "org.apache.hadoop.ipc.RetriableException",
    "message": "NameNode still not started"}}


@pytest.mark.parametrize("operation", ["stat", "read", "list", "evidence"])
def test_a_transient_error_is_retried_by_one_loop_only(operation):
    """Every operation makes ``max_attempts`` requests to a NameNode that keeps answering
    "retry later", not ``max_attempts`` squared (a read's retries around the NameNode call's)."""
    stub = StubNameNode(503, RETRIABLE)
    source = HdfsSource(f"hdfs://{stub.address}/d", HdfsOptions(user="etl", max_attempts=3))
    obj = RemoteObject(key="f", size=3, etag="5-3-1000", mtime=1.0)
    calls = {"stat": lambda: source.stat("f"), "read": lambda: source.read(obj, 0, 3),
             "list": lambda: list(source.list()), "evidence": lambda: source.evidence(obj)}
    try:
        with pytest.raises(SourceTransientError, match="RetriableException: NameNode still not started"):
            calls[operation]()
    finally:
        stub.close()
    assert len(stub.queries) == 3


# -- against the real cluster -------------------------------------------------------------------
def source_for(cluster: HdfsCluster, path: str, **options) -> HdfsSource:
    return HdfsSource(cluster.uri(path), HdfsOptions(user=options.pop("user", cluster.superuser),
                                                     **{"max_attempts": 2, **options}))


@pytest.mark.integration
def test_list_stat_and_read_every_file(hdfs_cluster, dataset):
    source = source_for(hdfs_cluster, "/ds/")
    listed = {o.key: o for o in source.list()}
    assert {k: o.size for k, o in listed.items()} == {k: len(v) for k, v in dataset["ds"].items()}
    for key, data in dataset["ds"].items():
        obj = listed[key]
        assert source.stat(key) == obj
        assert source.read(obj, 0, obj.size) == data, key


@pytest.mark.integration
def test_many_files_are_listed_in_batches(hdfs_cluster, dataset):
    source = source_for(hdfs_cluster, "/many")
    calls: list[tuple[str, str]] = []
    original = source._json

    def counting(op, key, params=None):
        calls.append((op, key))
        return original(op, key, params)

    source._json = counting
    keys = sorted(o.key for o in source.list())
    assert keys == sorted(dataset["many"])
    batches = [c for c in calls if c[0] == "LISTSTATUS_BATCH"]
    # Every directory is read in dfs.ls.limit-sized pages, resumed after the last name.
    assert len(batches) >= (MANY_TOP + 1) // LS_LIMIT + MANY_SUB // LS_LIMIT
    assert not [c for c in calls if c[0] == "LISTSTATUS"]


@pytest.mark.integration
def test_large_file_by_ranges_across_blocks(hdfs_cluster, dataset):
    source = source_for(hdfs_cluster, "/ds")
    data = dataset["ds"]["shard.bin"]
    obj = source.stat("shard.bin")
    rng = random.Random(1)
    ranges = [(0, 1), (BLOCK_SIZE - 10, 20), (3 * BLOCK_SIZE, BLOCK_SIZE),
              (len(data) - 100, 100), (5 * BLOCK_SIZE + 7, 8 * 1024 * 1024)]
    ranges += [(s, rng.randrange(1, 3 * BLOCK_SIZE)) for s in
               (rng.randrange(0, len(data) - 3 * BLOCK_SIZE) for _ in range(6))]
    for start, length in ranges:
        assert source.read(obj, start, length) == data[start:start + length], (start, length)


@pytest.mark.integration
def test_missing_path_names_it(hdfs_cluster, dataset):
    source = source_for(hdfs_cluster, "/no/such/dir")
    with pytest.raises(SourceNotFound, match=f"hdfs://{hdfs_cluster.http}/no/such/dir"):
        list(source.list())
    source = source_for(hdfs_cluster, "/ds")
    with pytest.raises(SourceNotFound, match="/ds/gone.bin"):
        source.stat("gone.bin")


@pytest.mark.integration
def test_permission_denied_for_another_user(hdfs_cluster, dataset):
    with pytest.raises(SourcePermissionDenied, match="/closed") as info:
        list(source_for(hdfs_cluster, "/closed", user=OTHER).list())
    assert OTHER in str(info.value)  # HDFS says who was refused
    source = source_for(hdfs_cluster, "/shared", user=OTHER)
    listed = {o.key: o for o in source.list()}  # the directory itself is readable
    assert set(listed) == {"secret.bin", "readme.txt"}
    with pytest.raises(SourcePermissionDenied, match="/shared/secret.bin"):
        source.read(listed["secret.bin"], 0, 10)
    assert source.read(listed["readme.txt"], 0, 12) == b"for everyone"
    # The owner reads both.
    owner = source_for(hdfs_cluster, "/", user=OWNER)
    assert owner.read(owner.stat("shared/secret.bin"), 0, 10) == b"alice only"
    assert [o.key for o in source_for(hdfs_cluster, "/closed", user=OWNER).list()] == ["inside.txt"]


@pytest.mark.integration
def test_a_file_changed_after_listing_is_never_mixed(hdfs_cluster, webhdfs, dataset):
    webhdfs.put("/changing/v.bin", b"A" * 5000)
    source = source_for(hdfs_cluster, "/changing")
    (obj,) = source.list()
    assert source.read(obj, 0, 10) == b"A" * 10
    webhdfs.put("/changing/v.bin", b"B" * 5000)  # same size, new file
    with pytest.raises(SourceChanged, match="changed since it was listed"):
        source.read(obj, 0, 10)
    webhdfs.delete("/changing/v.bin")
    with pytest.raises(SourceChanged, match="deleted"):
        source.read(obj, 0, 10)


@pytest.mark.integration
def test_root_that_is_a_file(hdfs_cluster, dataset):
    with pytest.raises(SourceError, match="is a file, not a directory"):
        list(source_for(hdfs_cluster, "/ds/empty.txt").list())


@pytest.mark.integration
def test_unreachable_namenode():
    source = HdfsSource(f"hdfs://127.0.0.1:{free_port()}/x", HdfsOptions(max_attempts=2))
    with pytest.raises(SourceUnreachable, match="cannot reach NameNode"):
        list(source.list())
    dead = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    source = HdfsSource("hdfs://ns/x", HdfsOptions(namenodes=dead, max_attempts=2))
    with pytest.raises(SourceUnreachable, match=f"cannot reach any NameNode of {','.join(dead)}"):
        source.stat("y")


@pytest.mark.integration
def test_rpc_port_instead_of_http_port_says_so(hdfs_cluster):
    source = HdfsSource(f"hdfs://{hdfs_cluster.rpc}/ds", HdfsOptions(max_attempts=1))
    with pytest.raises(SourceError, match="RPC port.*9870"):
        list(source.list())


@pytest.mark.integration
def test_ha_fails_over_from_dead_and_standby_namenodes(hdfs_cluster, dataset, standby):
    dead = f"127.0.0.1:{free_port()}"
    source = HdfsSource("hdfs://mycluster/ds", HdfsOptions(
        user=hdfs_cluster.superuser, namenodes=(dead, standby.address, hdfs_cluster.http),
        max_attempts=1))
    listed = {o.key: o for o in source.list()}
    assert set(listed) == set(dataset["ds"])
    assert source.read(listed["class0/img2.jpg"], 0, 100) == dataset["ds"]["class0/img2.jpg"][:100]
    # The active NameNode is remembered: later calls do not ask the standby again.
    asked = len(standby.queries)
    source.stat("empty.txt")
    assert len(standby.queries) == asked


@pytest.mark.integration
def test_transient_namenode_errors_are_retried(hdfs_cluster, dataset):
    proxy = FaultProxy(f"http://{hdfs_cluster.http}")
    try:
        proxy.add(Fault(status=503, path_contains="op=GETFILESTATUS", times=2))
        proxy.add(Fault(status=500, path_contains="op=OPEN", times=1))
        source = HdfsSource(f"hdfs://{proxy.endpoint.removeprefix('http://')}/ds",
                            HdfsOptions(user=hdfs_cluster.superuser, max_attempts=4))
        obj = source.stat("class0/img2.jpg")
        assert source.read(obj, 10, 1000) == dataset["ds"]["class0/img2.jpg"][10:1010]
        assert proxy.injected == 3
    finally:
        proxy.close()


@pytest.mark.integration
@pytest.mark.parametrize("op", ["OPEN", "GETFILESTATUS"])
def test_a_persistent_namenode_error_is_max_attempts_requests(hdfs_cluster, dataset, op):
    """A read is OPEN plus a version check (GETFILESTATUS), retried as a whole: a NameNode that
    keeps failing either sees ``max_attempts`` requests, not ``max_attempts`` squared."""
    proxy = FaultProxy(f"http://{hdfs_cluster.http}")
    try:
        source = HdfsSource(f"hdfs://{proxy.endpoint.removeprefix('http://')}/ds",
                            HdfsOptions(user=hdfs_cluster.superuser, max_attempts=3))
        obj = source.stat("class0/img2.jpg")
        proxy.add(Fault(status=503, path_contains=f"op={op}", times=100))
        with pytest.raises(SourceTransientError, match="class0/img2.jpg"):
            source.read(obj, 0, 100)
        assert proxy.injected == 3
    finally:
        proxy.close()


def test_example_dataset_is_a_valid_hdfs_dataset():
    import yaml

    from datahoard.api import Dataset
    from tests.support.hdfs import REPO

    doc = yaml.safe_load((REPO / "examples" / "dataset-hdfs.yaml").read_text())
    ds = Dataset.from_body({**doc, "metadata": {**doc["metadata"], "namespace": "ml"}})
    assert ds.spec.source.scheme == "hdfs"
    assert parse_hdfs_uri(ds.spec.source.uri).namenodes == ("namenode.hadoop:9870",)


@pytest.mark.integration
def test_directories_are_listed_concurrently(hdfs_cluster, webhdfs, dataset):
    tree = {f"/tree/p{i}/q{j}/f.txt": f"{i}.{j}".encode() for i in range(4) for j in range(4)}
    webhdfs.put_many(tree)
    source = source_for(hdfs_cluster, "/tree")
    in_flight, most = 0, 0
    lock = threading.Lock()
    original = source._json

    def slow(op, key, params=None):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.05)
            return original(op, key, params)
        finally:
            with lock:
                in_flight -= 1

    source._json = slow
    assert sorted(o.key for o in source.list()) == sorted(k.removeprefix("/tree/") for k in tree)
    assert most > 1


@pytest.mark.integration
def test_stopping_a_listing_early_ends_its_threads(hdfs_cluster, dataset):
    before = {t.name for t in threading.enumerate()}
    walk = source_for(hdfs_cluster, "/many").list()
    next(walk)
    walk.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = {t.name for t in threading.enumerate()} - before
        if not any(name.startswith("hdfs-list-") for name in left):
            break
        time.sleep(0.05)
    assert not any(name.startswith("hdfs-list-") for name in left)


@pytest.mark.integration
def test_unreadable_subdirectory_fails_the_whole_listing(hdfs_cluster, dataset):
    # A dataset with a hole in it is not served: the error names the directory and the user.
    with pytest.raises(SourcePermissionDenied, match=f"/closed.*{OTHER}"):
        list(source_for(hdfs_cluster, "/", user=OTHER).list())
