"""Listing snapshots: a canonical form named by its hash, served over real HTTP by the worker's
stats endpoint, refused when a peer sends anything else."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from datahoard.cache_worker import snapshot
from datahoard.cache_worker.index import Index, build_index_from, read_summary
from datahoard.cache_worker.source import RemoteObject
from datahoard.cache_worker.stats_server import StatsServer
from datahoard.stats import WarmingStats, WorkerStats

SOURCE = "s3://bucket/data/"


def listing(**changes: str) -> list[RemoteObject]:
    objs = {k: RemoteObject(k, len(k), f"etag-{k}", 1_700_000_000.5)
            for k in ["b/2.jpg", "a/1.jpg", "a/é.jpg", "z", "a/line\nbreak", "a/"]}
    for key, etag in changes.items():
        objs[key] = RemoteObject(key, 1, etag, 1.0)
    return list(objs.values())


def test_the_id_is_the_hash_of_the_sorted_canonical_listing(tmp_path):
    sid, path, count = snapshot.write(listing(), SOURCE, tmp_path / "a")
    again, _, _ = snapshot.write(reversed(listing()), SOURCE, tmp_path / "b")
    assert sid == again  # listing order does not matter
    assert count == 6 and path.name == f"snapshot-{sid}.jsonl.gz"
    text = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(text).hexdigest() == sid
    lines = text.decode().split("\n")
    assert json.loads(lines[0]) == {"datahoard_snapshot": 1, "source": SOURCE}
    keys = [json.loads(line)[0] for line in lines[1:-1]]
    assert keys == sorted(keys) == ["a/", "a/1.jpg", "a/line\nbreak", "a/é.jpg", "b/2.jpg", "z"]
    assert json.loads(lines[2]) == ["a/1.jpg", 7, "etag-a/1.jpg", "", 1_700_000_000.5]
    # One changed ETag, one new object, another source: other ids.
    assert snapshot.write(listing(z="other"), SOURCE, tmp_path / "c")[0] != sid
    assert snapshot.write(listing(new="e"), SOURCE, tmp_path / "d")[0] != sid
    assert snapshot.write(listing(), "s3://other/", tmp_path / "e")[0] != sid
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [path.name]  # no scratch left


def test_an_index_built_from_a_snapshot_is_the_listing(tmp_path):
    sid, path, _ = snapshot.write(listing(), SOURCE, tmp_path)
    summary = build_index_from(snapshot.read(path, sid, SOURCE), SOURCE, tmp_path / "index.db", snapshot=sid)
    assert summary.snapshot == sid and read_summary(tmp_path / "index.db").snapshot == sid
    index = Index(tmp_path / "index.db")
    assert index.lookup("a/é.jpg") == RemoteObject("a/é.jpg", 7, "etag-a/é.jpg", 1_700_000_000.5)
    assert index.lookup("a/line\nbreak").size == 12  # the newline survived the line format
    assert summary.files == 5  # "a/" is a directory marker


def test_a_tampered_snapshot_builds_nothing(tmp_path):
    sid, path, _ = snapshot.write(listing(), SOURCE, tmp_path)
    other_id, other, _ = snapshot.write(listing(z="evil"), SOURCE, tmp_path / "other")
    other.rename(path)  # the right name, another listing
    with pytest.raises(snapshot.SnapshotError, match=f"hashes to {other_id}, not {sid}: refused"):
        build_index_from(snapshot.read(path, sid, SOURCE), SOURCE, tmp_path / "index.db", snapshot=sid)
    assert not (tmp_path / "index.db").exists()
    assert not (tmp_path / "index.db.building").exists()


def test_a_snapshot_of_another_source_is_refused(tmp_path):
    sid, path, _ = snapshot.write(listing(), "s3://other/", tmp_path)
    with pytest.raises(snapshot.SnapshotError, match="it belongs to another dataset"):
        list(snapshot.read(path, sid, SOURCE))


def _stats() -> WorkerStats:
    return WorkerStats(source=SOURCE, mountpoint="/m", ready=True, files=0, total_bytes=0, cached_bytes=0,
                       capacity_bytes=0, served_from_cache_bytes=0, served_from_source_bytes=0, fetched_bytes=0,
                       hits=0, misses=0, skipped_keys=0, errors=0, warming=WarmingStats(state="idle"))


@pytest.fixture
def peer(tmp_path):
    """A real stats endpoint serving whatever file ``served`` maps an id to."""
    served: dict[str, object] = {}
    server = StatsServer(("127.0.0.1", 0), _stats, lambda: True, snapshot_file=served.get)
    server.start()
    yield server.url, served
    server.stop()


def test_fetch_from_a_peer_over_http(tmp_path, peer):
    url, served = peer
    sid, path, _ = snapshot.write(listing(), SOURCE, tmp_path / "lister")
    served[sid] = path
    got = snapshot.fetch(["http://127.0.0.1:9/", url], sid, tmp_path / "joiner", timeout=5)
    assert got.read_bytes() == path.read_bytes()
    assert [o.key for o in snapshot.read(got, sid, SOURCE)][:2] == ["a/", "a/1.jpg"]


def test_a_peer_cannot_feed_another_listing(tmp_path, peer):
    url, served = peer
    sid, _, _ = snapshot.write(listing(), SOURCE, tmp_path / "lister")
    _, evil, _ = snapshot.write(listing(z="evil"), SOURCE, tmp_path / "evil")
    served[sid] = evil
    joiner = tmp_path / "joiner"
    with pytest.raises(snapshot.SnapshotError, match=r"cannot get snapshot .* refused, it hashes to"):
        snapshot.fetch([url], sid, joiner, timeout=5)
    assert list(joiner.iterdir()) == []  # nothing kept from it


def test_a_peer_without_it_says_so(tmp_path, peer):
    url, _ = peer
    with pytest.raises(snapshot.SnapshotError, match="HTTP 404 .it does not hold that snapshot"):
        snapshot.fetch([url], "0" * 64, tmp_path, timeout=5)
    with pytest.raises(snapshot.SnapshotError, match="not a snapshot id"):
        snapshot.fetch([url], "abc", tmp_path, timeout=5)
