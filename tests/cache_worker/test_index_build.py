"""IndexBuilder (index_build.py), the one path by which a new index replaces the served one, at
a worker's start and in a refresh of a mounted view; without root."""

from __future__ import annotations

import threading

import pytest

from datahoard.cache_worker import snapshot
from datahoard.cache_worker.index import Index
from datahoard.cache_worker.index_build import INDEX, PREVIOUS, IndexBuilder, cleanup
from datahoard.cache_worker.keys import KeyFilter
from datahoard.cache_worker.source import RemoteObject
from datahoard.cache_worker.worker_config import WorkerError

T = 1_700_000_000.0
URI = "s3://bucket/ds/"


def listing(*keys: str) -> list[RemoteObject]:
    return [RemoteObject(key, 10 + i, f"e-{key}", T) for i, key in enumerate(keys)]


def builder(tmp_path, current=None) -> IndexBuilder:
    return IndexBuilder(tmp_path, URI, KeyFilter((), ()), current)


def from_other_thread(fn):
    """``fn()`` in a new thread: a new SQLite connection, opened by the name the index has now."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_each_build_keeps_the_one_it_replaced_under_one_second_name(tmp_path):
    first = builder(tmp_path)
    a = first.build(first.list(listing("x/1", "x/2")))
    served_a = Index(tmp_path / INDEX)
    x1 = served_a.lookup("x/1")

    second = builder(tmp_path, served_a)
    b_id = second.list(listing("x/1", "y/3"))
    second.build(b_id)
    assert second.replaced is served_a and (tmp_path / PREVIOUS).exists()
    assert Index(tmp_path / PREVIOUS).summary.snapshot == a.snapshot
    # The replaced index still answers, from new threads too: the view asks it for ids only it
    # knows while the kernel holds them.
    assert from_other_thread(lambda: served_a.lookup("x/2")) is not None
    assert [name for _, name in second.stale_names] == ["2"]   # x/2, removed (y/ is new: nothing to drop)
    served_b = Index(tmp_path / INDEX)
    assert served_b.summary.snapshot == b_id
    assert served_b.lookup("x/1").key == x1.key      # unchanged: the same object

    third = builder(tmp_path, served_b)
    third.build(third.list(listing("x/1", "y/3", "z/4")))
    # One generation: the second name now holds b, and a's object is no longer reachable by it.
    assert Index(tmp_path / PREVIOUS).summary.snapshot == b_id
    assert from_other_thread(lambda: served_b.lookup("y/3")) is not None
    assert sorted(p.name for p in tmp_path.glob("index.db*")) == [INDEX, PREVIOUS]


def test_a_refused_build_leaves_the_served_index_as_it_was(tmp_path):
    first = builder(tmp_path)
    a = first.build(first.list(listing("x/1")))
    served = Index(tmp_path / INDEX)
    again = builder(tmp_path, served)
    empty = again.list(listing())
    with pytest.raises(WorkerError, match="the new listing is refused: nothing here"):
        again.build(empty, check=lambda summary: "nothing here" if not summary.files else None)
    assert Index(tmp_path / INDEX).summary.snapshot == a.snapshot
    assert not (tmp_path / "index.db.next").exists() and not (tmp_path / PREVIOUS).exists()
    assert again.built is None and again.replaced is None and not again.stale_names


def test_a_snapshot_not_here_without_peers_says_what_to_give(tmp_path):
    with pytest.raises(WorkerError, match=r"snapshot a{64} is not in .* no peer was given .*--snapshot-from"):
        builder(tmp_path).fetch("a" * 64, ())


def test_cleanup_at_start_removes_every_half_built_or_retired_index(tmp_path):
    for name in ("index.db.next", PREVIOUS, PREVIOUS + ".tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / INDEX).write_bytes(b"kept")
    cleanup(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [INDEX]


def test_a_build_reads_the_snapshot_file_it_is_given(tmp_path):
    b = builder(tmp_path)
    snap = b.list(listing("only"))
    assert (tmp_path / snapshot.file_name(snap)).exists()
    summary = b.build(snap)
    assert summary.files == 1 and b.built == snap and b.diff is None and b.replaced is None
    assert Index(tmp_path / INDEX).lookup("only").size == 10
