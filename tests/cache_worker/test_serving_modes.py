"""The serving modes without root, FUSE or network: the "fully cached" event over a real
ChunkStore and DatasetCache (reading from the in-memory store), and the state machine and
choices in serving.py.

What is pinned here: the event comes from the store's changes, not from a poll (``settle``
decides on what the store reported, with no thread and no wait): the last missing chunk cached
makes the dataset fully cached, an eviction or a chunk found corrupt makes it not; a store
holding fewer bytes than the dataset never walks the index; kernel opens are one-way; a
removed bind returns to the mode underneath.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from datahoard.cache_worker.completeness import Completeness
from datahoard.cache_worker.dataset import DatasetCache, ReadState
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.index import Index
from datahoard.cache_worker.serving import (BadTransition, Event, Mode, ServingMode, kernel_opens_refusal,
                                            stop_plan, use_passthrough)
from datahoard.cache_worker.store import ChunkStore, chunk_of, object_id
from tests.support.fakes.dataset import fake_dataset

CHUNK = 4096
BUCKET = "data"
FILES = {"a.bin": b"a" * 1000, "dir/b.bin": b"b" * 3000, "dir/c.bin": b"c" * (2 * CHUNK + 5), "empty": b""}


@dataclass
class Rig:
    index: Index
    store: ChunkStore
    cache: DatasetCache
    watch: Completeness
    events: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        # "empty" is never read: a read of it stores nothing, and it needs nothing cached.
        self.objects = {o.key: o for o in self.index.walk_files()}

    def read(self, key: str) -> None:
        obj = self.objects[key]
        self.cache.read(ReadState(obj), 0, obj.size)

    def settle(self) -> list[bool]:
        self.watch.settle()
        return self.events


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with fake_dataset(tmp_path, FILES, Tuning(whole_file_max=CHUNK, chunk_size=CHUNK), BUCKET) as d:
        watch = Completeness(d.index, d.cache)
        made = Rig(d.index, d.store, d.cache, watch)
        watch.subscribe(made.events.append)
        watch.attach()
        yield made
        watch.stop()


def test_the_last_missing_chunk_cached_makes_the_dataset_fully_cached(rig):
    assert rig.settle() == [] and not rig.watch.full  # nothing cached at start: no event
    rig.read("a.bin")
    rig.read("dir/b.bin")
    assert rig.settle() == []  # c.bin is still missing
    rig.read("dir/c.bin")
    assert rig.settle() == [True] and rig.watch.full
    rig.read("a.bin")  # a hit changes nothing in the store: no new event
    assert rig.settle() == [True]


def test_a_dropped_chunk_makes_it_not_fully_cached_and_refetching_it_full_again(rig):
    for key in ("a.bin", "dir/b.bin", "dir/c.bin"):
        rig.read(key)
    assert rig.settle() == [True]
    c = rig.objects["dir/c.bin"]
    rig.store.discard(rig.cache.chunks(c)[1].name)  # found corrupt, say
    assert rig.settle() == [True, False] and not rig.watch.full
    rig.read("dir/c.bin")
    assert rig.settle() == [True, False, True]


def test_an_eviction_for_room_makes_it_not_fully_cached(rig):
    for key in ("a.bin", "dir/b.bin", "dir/c.bin"):
        rig.read(key)
    assert rig.settle() == [True]
    rig.store.capacity = rig.store.used_bytes  # the next chunk must push the oldest out
    other = chunk_of(object_id("elsewhere", "etag", 1000), 1000, 0, CHUNK)
    rig.store.put(other, b"x" * 1000)  # room for another object's chunk evicts one of ours
    assert rig.settle() == [True, False]


def test_a_store_smaller_than_the_dataset_never_walks_the_index(rig, monkeypatch):
    walks = []
    real = rig.index.walk_files
    monkeypatch.setattr(rig.index, "walk_files", lambda: walks.append(1) or real())
    rig.read("dir/c.bin")
    rig.settle()
    assert walks == [] and rig.events == []


def test_the_started_watch_reports_the_event_on_its_thread(rig):
    """Started, the watch hears the store on its own thread: the event arrives once the last
    chunk is cached (the wait is only a bound for a broken build)."""
    got = threading.Event()
    rig.watch.subscribe(lambda full: full and got.set())
    rig.watch.start()
    assert rig.watch.wait_decided(10) and not got.is_set()
    for key in ("a.bin", "dir/b.bin", "dir/c.bin"):
        rig.read(key)
    assert got.wait(10), "no fully-cached event after the last chunk was cached"


def test_a_dataset_found_fully_cached_at_start_is_reported_to_a_late_listener(rig):
    for key in ("a.bin", "dir/b.bin", "dir/c.bin"):
        rig.read(key)
    assert rig.settle() == [True]
    late: list[bool] = []
    rig.watch.subscribe(late.append)
    assert late == [True]


def test_kernel_opens_are_one_way_and_a_removed_bind_returns_to_the_mode_underneath():
    mode = ServingMode()
    assert (mode.mode.serving, mode.mode.kernel_opens) == ("fuse", False)
    assert mode.apply(Event.FULLY_CACHED) is Mode.FUSE_KERNEL_OPENS
    assert not mode.allows(Event.FULLY_CACHED)  # no second switch, and no event leads back
    assert mode.apply(Event.TREE_BOUND) is Mode.DIRECT_KERNEL_OPENS
    assert (mode.mode.serving, mode.mode.kernel_opens) == ("direct", True)
    with pytest.raises(BadTransition, match="direct\\+kernel-opens does not allow tree bound"):
        mode.apply(Event.TREE_BOUND)
    assert mode.apply(Event.TREE_UNBOUND) is Mode.FUSE_KERNEL_OPENS
    assert mode.apply(Event.TREE_UNBOUND) is Mode.FUSE_KERNEL_OPENS  # shutdown unbinds regardless


def test_a_tree_bound_before_the_event_keeps_direct_and_adds_kernel_opens():
    mode = ServingMode()
    mode.apply(Event.TREE_BOUND)
    assert mode.apply(Event.FULLY_CACHED) is Mode.DIRECT_KERNEL_OPENS
    assert mode.apply(Event.TREE_UNBOUND).serving == "fuse"


def test_the_choices():
    assert use_passthrough("auto", CHUNK + 1, CHUNK) and not use_passthrough("auto", CHUNK, CHUNK)
    assert use_passthrough("on", 1, CHUNK) and not use_passthrough("off", CHUNK + 1, CHUNK)
    # Small files beyond what the page cache can hold: the cache disk is read every epoch.
    assert use_passthrough("auto", CHUNK, CHUNK, total_bytes=5 << 30, memory_bytes=8 << 30)
    assert not use_passthrough("auto", CHUNK, CHUNK, total_bytes=3 << 30, memory_bytes=8 << 30)
    assert not use_passthrough("off", CHUNK, CHUNK, total_bytes=5 << 30, memory_bytes=8 << 30)
    assert kernel_opens_refusal(True, False, CHUNK, CHUNK) is None
    assert "turned off" in kernel_opens_refusal(False, False, CHUNK, CHUNK)
    assert "passthrough" in kernel_opens_refusal(True, True, CHUNK, CHUNK)
    assert "read by read" in kernel_opens_refusal(True, False, CHUNK + 1, CHUNK)
    assert stop_plan(True, True).handover
    assert not stop_plan(True, False).handover and not stop_plan(False, True).handover
