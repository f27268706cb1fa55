"""The direct-tree thread without root, FUSE or network: a real DirectTrees (hard links in a
temporary directory) over the fake dataset, the real "fully cached" event, no bind.

What is pinned here: the thread is driven by events, not a tick (issue 16). It builds the tree
when the dataset becomes fully cached, relinks an entry whose chunk was found corrupt when that
is reported, removes an old tree when its last reference file goes, and in between it sleeps
with no time limit: its wake-ups are counted in the code (``DirectServing.wakeups``), and none
happen while nothing changes. The loop it replaced woke every 0.2 s, and looked for old trees to
remove every 30 s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datahoard import tree_layout
from datahoard.cache_worker.completeness import Completeness
from datahoard.cache_worker.dataset import ReadState
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.direct_mode import DirectServing
from datahoard.cache_worker.serving import ServingMode
from datahoard.cache_worker.tree import DirectTrees
from tests.support.fakes.dataset import FakeDataset, fake_dataset
from tests.support.polling import eventually

CHUNK = 4096
FILES = {"a.bin": os.urandom(1000), "dir/b.bin": os.urandom(3000), "dir/c.bin": os.urandom(2 * CHUNK + 5),
         "empty": b""}
#: Long enough for the old loop to wake several times (every 0.2 s); the new one must not at all.
QUIET_SECONDS = 1.0


@dataclass
class Rig:
    data: FakeDataset
    trees: DirectTrees
    direct: DirectServing
    watch: Completeness

    def start(self) -> None:
        self.watch.start()
        self.direct.start()

    def read_all(self) -> None:
        for obj in self.data.index.walk_files():
            self.data.cache.read(ReadState(obj), 0, obj.size)

    def ready_tree(self) -> Path:
        stats = eventually(lambda: self.direct.stats.state in ("ready", "failed") and self.direct.stats,
                           timeout=30, what="the direct tree to be built")
        assert stats.state == "ready", stats
        return Path(stats.path)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with fake_dataset(tmp_path, FILES, Tuning(whole_file_max=CHUNK, chunk_size=CHUNK)) as data:
        watch = Completeness(data.index, data.cache)
        trees = DirectTrees(tmp_path / "cache-dir", data.index, data.cache)
        stop = threading.Event()
        direct = DirectServing("s3://data/", tmp_path / "mnt", False, trees, data.store, watch, data.counters,
                               ServingMode(), stop, warming=lambda: False, publish=lambda path: None)
        try:
            yield Rig(data, trees, direct, watch)
        finally:
            stop.set()
            direct.join(timeout=10)
            direct.opens.stop()  # the tree's fanotify watch, as the worker's shutdown stops it
            watch.stop()


def quiet() -> None:
    """Let time pass with nothing happening (not a measurement: a window for wrong wake-ups)."""
    threading.Event().wait(QUIET_SECONDS)


def test_the_thread_sleeps_until_the_dataset_is_fully_cached_then_builds_and_sleeps_again(rig):
    rig.start()
    eventually(lambda: rig.direct.stats.message, timeout=30, what="the thread to say it waits")
    before = rig.direct.wakeups
    quiet()
    assert rig.direct.wakeups == before, "the thread woke up although nothing changed"
    assert rig.direct.wait_limit is None  # it sleeps until an event, with no timer

    rig.read_all()  # the last chunk cached: the completeness event wakes it
    tree = rig.ready_tree()
    assert (tree / "dir" / "c.bin").read_bytes() == FILES["dir/c.bin"]
    built = rig.direct.wakeups
    assert built - before == 1, f"{built - before} wake-ups to build the tree; the event is one"
    quiet()
    assert rig.direct.wakeups == built, "the thread woke up after the tree was ready, with nothing changed"
    assert rig.direct.wait_limit is None


def test_an_entry_whose_chunk_was_found_corrupt_is_relinked_on_that_report(rig):
    rig.start()
    rig.read_all()
    tree = rig.ready_tree()
    obj = rig.data.index.lookup("dir/b.bin")
    entry = tree / "dir" / "b.bin"
    before = rig.direct.wakeups
    held = os.open(entry, os.O_RDONLY)   # keeps the corrupt file's inode, so its links can be counted
    try:
        rig.data.store.discard(rig.data.cache.chunks(obj)[0].name)  # what a failed CRC check does
        # Unlinked at once, on the reporting thread, from the store and the tree alike: wrong bytes
        # are never served from the tree. (The entry itself may already be relinked to the
        # refetched chunk: the thread is fast against the in-memory store.)
        assert os.fstat(held).st_nlink == 0
    finally:
        os.close(held)
    eventually(lambda: entry.exists() and entry.read_bytes() == FILES["dir/b.bin"], timeout=30,
               what="the entry to be relinked")
    assert os.stat(entry).st_ino == os.stat(rig.data.store.path(rig.data.cache.chunks(obj)[0].object_id)).st_ino
    # Events, each waking the thread at most once (two close together may wake it once): the
    # dataset no longer fully cached (the discard), the report, and fully cached again once the
    # chunk was refetched; the last may come after the entry is relinked, so wait for it.
    eventually(lambda: rig.watch.full, timeout=30, what="the dataset to be fully cached again")
    quiet()
    woken = rig.direct.wakeups - before
    assert 1 <= woken <= 3, f"{woken} wake-ups for one repair"
    settled = rig.direct.wakeups
    quiet()
    assert rig.direct.wakeups == settled


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs CAP_SYS_ADMIN (run as root)")
def test_opens_of_the_tree_count_and_so_do_those_of_a_relinked_entry(rig):
    """The tree's watch (direct_opens.py) counts each open as a hit of the file's size; a
    relinked entry is a new inode, so a new handle, which the watch learns with the repair."""
    rig.start()
    rig.read_all()
    tree = rig.ready_tree()
    counters = rig.data.counters
    base = counters.served_from_cache
    (tree / "a.bin").read_bytes()
    (tree / "dir" / "c.bin").read_bytes()
    rig.direct.opens.drain()
    assert counters.served_from_cache - base == len(FILES["a.bin"]) + len(FILES["dir/c.bin"])

    entry = tree / "dir" / "b.bin"
    obj = rig.data.index.lookup("dir/b.bin")
    held = os.open(entry, os.O_RDONLY)  # keeps the old inode: its number cannot be reused
    try:
        old_inode = os.fstat(held).st_ino
        rig.data.store.discard(rig.data.cache.chunks(obj)[0].name)  # what a failed CRC check does
        eventually(lambda: entry.exists() and os.stat(entry).st_ino != old_inode, timeout=30,
                   what="the entry to be relinked")
    finally:
        os.close(held)
    rig.direct.opens.drain()
    base = counters.served_from_cache
    eventually(lambda: (entry.read_bytes(), rig.direct.opens.drain(),
                        counters.served_from_cache - base >= len(FILES["dir/b.bin"]))[2],
               timeout=10, what="an open of the relinked entry to count")


def test_an_old_tree_is_removed_when_its_last_reference_file_goes_not_on_a_timer(rig):
    old = rig.trees.tree_path("0123456789abcdef")  # a tree of an earlier snapshot
    (old / "dir").mkdir(parents=True)
    targets = ["/var/lib/kubelet/pods/a/volumes/data", "/var/lib/kubelet/pods/b/volumes/data"]
    for target in targets:
        tree_layout.add_ref(old, target)  # two pods bind it (CSI node plugin)
    rig.start()
    eventually(lambda: rig.direct.stats.message and rig.direct.sleeping, timeout=30,
               what="the thread to say it waits, and sleep with its watches in place")
    assert old.is_dir()  # kept: referenced
    # While it waits it also watches the mount tables, which any mount on this machine changes:
    # wake-ups are not counted here, only that it sleeps with no time limit.
    before = rig.direct.wakeups
    tree_layout.drop_ref(old, targets[0])
    eventually(lambda: rig.direct.wakeups > before, timeout=30, what="the removal of a reference to wake it")
    assert old.is_dir()  # one pod still binds it
    assert rig.direct.wait_limit is None  # it slept until an event: no timer
    tree_layout.drop_ref(old, targets[1])
    eventually(lambda: not old.exists() and not tree_layout.refs_dir(old).exists(), timeout=10,
               what="the old tree to be removed once nothing references it (the old loop took up to 30 s)")
    assert rig.trees.old_trees() == set()


def test_a_chunk_found_corrupt_before_the_tree_is_built_is_fetched_again_by_the_build(rig):
    """A check other than the tree's (arming ahead, a read) may find a chunk corrupt after the
    dataset became fully cached and before the tree is built. The build fetches it again, as
    it does a chunk it finds corrupt itself; it used to find the file missing and fail ("not
    fully cached yet"), and with no warming nothing fetched it: no tree, for good."""
    rig.read_all()
    obj = rig.data.index.lookup("dir/c.bin")
    rig.data.store.discard(rig.data.cache.chunks(obj)[1].name)  # what a failed CRC check does
    assert not rig.data.cache.is_cached(obj)
    info = rig.trees.build()
    assert (Path(info.path) / "dir" / "c.bin").read_bytes() == FILES["dir/c.bin"]
    assert rig.data.cache.is_cached(obj)


def _corrupt_when_placing(rig, victim: str, when: str, wanted: bool):
    """A ``_place`` that, right after placing ``when``, rots ``victim``'s cache file in place
    (the tree's entry is a hard link to it) and reports it as a failed check of a read through
    the FUSE view does (``store.discard``): the moment, in a real run, is any moment."""
    place = rig.trees._place
    obj = rig.data.index.lookup(victim)
    chunk = rig.data.cache.chunks(obj)[0]

    def place_then_corrupt(o, tree, fresh):
        changed = place(o, tree, fresh=fresh)
        if o.key == when and fresh == wanted:
            with open(rig.data.store.path(chunk.object_id), "r+b") as f:
                f.write(b"\0" * 16)
            rig.data.store.discard(chunk.name)
        return changed

    return place_then_corrupt


def test_a_chunk_found_corrupt_while_the_tree_is_built_is_not_in_the_tree_it_publishes(rig, monkeypatch):
    """The build had already linked dir/b.bin when a read found its chunk corrupt: the link
    kept the rotten inode after the cache file was unlinked, and the tree published it, served
    until the next build (the direct tree is read with no check). The build now places such an
    entry again before the tree becomes current."""
    rig.read_all()
    monkeypatch.setattr(rig.trees, "_place", _corrupt_when_placing(rig, "dir/b.bin", "dir/c.bin", wanted=True))
    info = rig.trees.build()
    assert rig.trees.current == info
    tree = Path(info.path)
    assert (tree / "dir" / "b.bin").read_bytes() == FILES["dir/b.bin"]
    assert read_tree(tree) == FILES


def test_a_chunk_found_corrupt_while_a_reused_tree_is_verified_is_not_left_in_it(rig, monkeypatch):
    """The same at start-up, for the last run's tree (which a pod's bind may still show): an
    entry checked before the report is placed again before the tree is current (and unlinked at
    once where its chunk is already pinned for the tree: here the pins of these four files are
    written at the end of the check, so only the second step is seen)."""
    rig.read_all()
    info = rig.trees.build()
    rig.trees.current = None  # a new worker: the tree on disk is checked before it is used
    monkeypatch.setattr(rig.trees, "_place", _corrupt_when_placing(rig, "dir/b.bin", "dir/c.bin", wanted=False))
    rig.trees.verify(info)
    assert rig.trees.current == info
    assert read_tree(Path(info.path)) == FILES


def read_tree(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def test_a_chunk_dropped_before_the_tree_heard_of_it_is_fetched_again_by_the_build(rig):
    """The store removes a dropped chunk's record first and tells the tree after
    (``on_discard``). A build that looked in between found the file missing and failed ("not
    fully cached yet"), and with no warming nothing fetched it: no tree, for good. It was the
    rare failure of test_direct.py's ``test_a_corrupt_chunk_is_refetched_before_it_is_linked``
    (start-up checks drop the rotten chunks while the tree is built). The build now asks the
    store, whose note of the drop comes with the record's removal."""
    rig.read_all()
    obj = rig.data.index.lookup("dir/c.bin")
    name = rig.data.cache.chunks(obj)[1].name
    told = rig.data.store.on_discard
    rig.data.store.on_discard = None  # the report has not reached the tree yet
    try:
        assert rig.data.store.discard(name)
    finally:
        rig.data.store.on_discard = told
    assert rig.data.store.was_discarded(name)
    info = rig.trees.build()
    assert read_tree(Path(info.path)) == FILES
    assert not rig.data.store.was_discarded(name)  # stored again


def test_a_reference_removed_while_the_thread_sets_up_its_watch_is_not_missed(rig, monkeypatch):
    """The thread looks (``_step``), then sets up its watches, then sleeps. A reference file
    removed between the look and the watch sent no event to anything: the thread slept with
    no time limit, and the old tree stayed until some other event (under load, the rare
    failure of the test above). Now a watch set up anew is followed by one more look."""
    old = rig.trees.tree_path("0123456789abcdef")
    (old / "dir").mkdir(parents=True)
    target = "/var/lib/kubelet/pods/a/volumes/data"
    tree_layout.add_ref(old, target)
    watch_removals = rig.direct._wakeup.watch_removals

    def removed_first(dirs):
        dirs = list(dirs)
        if dirs:
            tree_layout.drop_ref(old, target)  # the CSI plugin, just before the watch is in place
        return watch_removals(dirs)

    monkeypatch.setattr(rig.direct._wakeup, "watch_removals", removed_first)
    rig.start()
    eventually(lambda: not old.exists(), timeout=10, what="the old tree to be removed")
