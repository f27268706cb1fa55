"""Arms of the native responder in the backing table (fusell/passthrough_native.py), without the
kernel: the table's bookkeeping across drops and restarts, with the real native library (whose
state needs no FUSE descriptor until it serves) and a connection whose backing ids follow the
kernel's rules (cyclic ids from 1; closing an unknown id is ENOENT). A native open is what
fastopen.c does before its reply: one up on the arm's slot count. The same paths against the
kernel, through real mounts: test_native_opens.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from datahoard.cache_worker.fusell import fastopen
from datahoard.cache_worker.fusell.connection import Connection
from datahoard.cache_worker.fusell.passthrough import BackingTable
from datahoard.cache_worker.fusell.passthrough_native import _COUNT, DEFAULT_ARMS, arms_for
from datahoard.cache_worker.fusell.state import InitState


class _Kernel(Connection):
    def __init__(self) -> None:
        super().__init__(-1, InitState(passthrough=True))
        self.ids: dict[int, int] = {}
        self.closed: list[int] = []
        self._next = 1

    def backing_open(self, backing_fd: int) -> int:
        bid, self._next = self._next, self._next + 1
        self.ids[bid] = os.fstat(backing_fd).st_ino
        return bid

    def backing_close(self, backing_id: int) -> None:
        if self.ids.pop(backing_id, None) is None:
            raise OSError(errno.ENOENT, "no such backing id")
        self.closed.append(backing_id)


@pytest.fixture
def lib():
    lib = fastopen.load()
    assert lib is not None, f"the native part must be built by make: {fastopen.unavailable}"
    return lib


def _passed(t: BackingTable, nodeid: int, file: Path):
    choice = t.open(nodeid, lambda: os.open(file, os.O_RDONLY))
    assert choice.backing_id is not None
    st = os.stat(file)
    assert t.arm(nodeid, str(file), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return choice


def _native_open(t: BackingTable, nodeid: int) -> int:
    slot = t._armed[nodeid]
    _COUNT.pack_into(t._counts, slot * _COUNT.size, t.count(slot) + 1)
    return slot


def _one_native_open(tmp_path: Path, lib):
    """A table whose node 7 was passed through by Python, armed, released, then opened once
    natively: (kernel, table, Python's choice, the arm's slot)."""
    file = tmp_path / "f"
    file.write_bytes(b"x" * 100)
    kernel = _Kernel()
    t = BackingTable(tmp_path / "log", kernel)
    t.start_native(lib, -1)
    choice = _passed(t, 7, file)
    t.release(7, choice.fh)
    return kernel, t, choice, _native_open(t, 7)


def test_an_arm_keeps_the_id_until_its_last_native_open_is_released(tmp_path: Path, lib):
    kernel, t, choice, slot = _one_native_open(tmp_path, lib)
    assert t.mode(7) == (choice.backing_id, 1, 0), "the arm is a passthrough open of its own"
    t.drop(7)  # evicted while the native handle is open
    assert not t.is_armed(7) and kernel.closed == []
    assert t.settle() == 1
    t.native_released(slot)  # its RELEASE
    assert t.settle() == 0
    assert kernel.closed == [choice.backing_id] and t.mode(7) == (None, 0, 0)


def test_a_restarted_table_keeps_inherited_arms_until_their_counts_drain(tmp_path: Path, lib):
    kernel, t, choice, slot = _one_native_open(tmp_path, lib)
    free = (slot + 1) % t.slots
    _COUNT.pack_into(t._counts, free * _COUNT.size, 5)  # a count no arm holds: stale
    # SIGKILL: nothing closed. The next process has no native part (fastopen.load refused).
    t2 = BackingTable(tmp_path / "log", kernel)
    assert t2.count(free) == 0 and t2.count(slot) == 1
    assert not t2.is_armed(7), "an inherited arm is checked again by Python before it is armed"
    assert t2.settle() == 1 and t2.mode(7) == (choice.backing_id, 1, 0)
    t2.native_released(slot)  # the dead worker's handle is released to this one
    assert t2.settle() == 0 and kernel.closed == [choice.backing_id]


def test_past_the_bound_the_least_recently_opened_arm_is_disarmed(tmp_path: Path, lib):
    files = {}
    for n in (7, 8, 9):
        files[n] = tmp_path / f"f{n}"
        files[n].write_bytes(b"x" * n)
    t = BackingTable(tmp_path / "log", _Kernel(), arms=2)
    t.start_native(lib, -1)
    for n in (7, 8):
        t.release(n, _passed(t, n, files[n]).fh)
    t.used([7])  # opened natively since: 8 is now the least recently used
    t.release(9, _passed(t, 9, files[9]).fh)
    assert [n for n in (7, 8, 9) if t.is_armed(n)] == [7, 9]


def test_arming_and_disarming_past_the_bound_keeps_the_table_probes_short(tmp_path: Path, lib):
    """Each disarm leaves a tombstone in the C table, and a probe for a node id not armed (the
    first open of every file) runs until an empty slot: without compaction, churn past the
    bound (a dataset with more files than arms) ends with every open scanning the whole table."""
    import mmap

    slots = 256
    counts = mmap.mmap(-1, slots * 8)
    native = fastopen.NativeOpens(lib, -1, counts, slots)
    try:
        identity = (1, 2, 3, 4)
        for n in range(1, 20_000):
            if n > slots:
                assert native.disarm(n - slots)
            assert native.arm(n, 1, n % slots, "/nonexistent", identity)
        assert native.stats()["tombstones"] < 2 * slots  # compacted well before the table fills
        assert [n for n in range(1, 20_000) if native.disarm(n)] == list(range(20_000 - slots, 20_000))
        assert not native.disarm(10**9)
    finally:
        native.close()


GiB = 1 << 30


def test_the_bound_scales_with_the_nodes_memory():
    """A fixed 65,536 armed about 5% of a shuffled ImageNet's opens (passthrough_native.py)."""
    assert arms_for(0) == DEFAULT_ARMS
    assert arms_for(8 * GiB) == DEFAULT_ARMS
    assert arms_for(24 * GiB) > 100_000
    assert arms_for(256 * GiB) > 1_281_167, "ImageNet-1k's training files, on a 256 GiB node"
    assert arms_for(256 * GiB) * 4 * 1024 <= 256 * GiB // 40, "under 1/40 of the node's memory (4 KB an arm)"


def test_a_memory_limit_bounds_the_arms_too(tmp_path: Path):
    """What arms hold is charged to the worker's cgroup: on a 256 GiB node a 4Gi pod (the
    default limit) must not arm 1.4 million files (5.6 GB)."""
    from datahoard.cache_worker.serving import memory_limit

    assert arms_for(256 * GiB, 4 * GiB) == 131_072, "4 KB an arm in 1/8 of the limit"
    assert arms_for(256 * GiB, 4 * GiB) * 4 * 1024 <= 4 * GiB // 8
    assert arms_for(24 * GiB, 512 << 20) == 16_384
    assert arms_for(24 * GiB, 1 << 20) == 1024, "a floor under any limit"
    assert arms_for(24 * GiB, 64 * GiB) == arms_for(24 * GiB), "a limit above the node's share changes nothing"
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert memory_limit((str(v2), str(v1))) == 0, "no cgroup files: no limit"
    v1.write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit((str(v2), str(v1))) == 0
    v2.write_text("max\n")
    assert memory_limit((str(v2), str(v1))) == 0
    v2.write_text(f"{4 * GiB}\n")
    assert memory_limit((str(v2), str(v1))) == 4 * GiB


def test_more_files_than_the_old_fixed_bound_stay_armed(tmp_path: Path, lib):
    """Every file of a dataset of 70,000 whole files stays armed on a 24 GiB node, so a shuffled
    epoch finds every open armed (with 65,536 arms, 4,464 of them were disarmed each epoch)."""
    file = tmp_path / "f"
    file.write_bytes(b"x" * 100)
    st = os.stat(file)
    identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    t = BackingTable(tmp_path / "log", _Kernel(), arms=arms_for(24 * GiB))
    t.start_native(lib, -1)
    try:
        for nodeid in range(1, 70_001):
            choice = t.open(nodeid, lambda: os.open(file, os.O_RDONLY))
            assert t.arm(nodeid, str(file), identity)
            t.release(nodeid, choice.fh)
        assert all(t.is_armed(n) for n in range(1, 70_001))
    finally:
        t.close()


def test_the_native_table_grows_with_its_arms_not_with_the_bound(lib):
    """The bound is hundreds of thousands of arms on a big node; a table sized for it up front
    would keep tens of MB resident for a small dataset (fastopen.c, ``rehash``)."""
    import mmap

    slots = 1 << 22
    counts = mmap.mmap(-1, slots * 8)
    native = fastopen.NativeOpens(lib, -1, counts, slots)
    try:
        assert native.stats()["capacity"] <= 1024
        identity = (1, 2, 3, 4)
        for n in range(1, 10_001):
            assert native.arm(n, n, n, f"/nonexistent/{n}", identity)
        assert 20_000 <= native.stats()["capacity"] <= 65_536
        assert [n for n in range(1, 10_001) if native.disarm(n)] == list(range(1, 10_001))
    finally:
        native.close()


def test_a_restart_with_a_smaller_bound_keeps_the_inherited_arms(tmp_path: Path, lib):
    """The bound follows the node's memory, which an upgrade's new rule (or a resized node) can
    change: an inherited arm above the new bound still counts its native opens down."""
    kernel = _Kernel()
    t = BackingTable(tmp_path / "log", kernel, arms=8)
    t.start_native(lib, -1)
    files = [tmp_path / f"f{n}" for n in range(5)]
    for n, file in enumerate(files, start=1):
        file.write_bytes(b"x" * n)
        t.release(n, _passed(t, n, file).fh)
    slot = _native_open(t, 5)
    assert slot >= 2
    t2 = BackingTable(tmp_path / "log", kernel, arms=2)  # SIGKILL, then a smaller bound
    assert t2.slots > slot and t2.count(slot) == 1
    t2.native_released(slot)
    assert t2.settle() == 0 and t2.mode(5) == (None, 0, 0)


class _SwappedDuringWalk:
    """An index that a refresh replaces while arming ahead reads its first directory."""

    def __init__(self, fs, index) -> None:
        self._fs, self._index = fs, index

    def entries(self, dir_id: int):
        entries = self._index.entries(dir_id)
        self._fs.index = self._index  # what take_index does: another index object from here on
        return entries


def test_arming_ahead_arms_every_cached_file_and_a_refresh_ends_the_run(tmp_path: Path, lib):
    """Arming ahead (cache_worker/arm_ahead.py) over a real index and store: every cached file
    armed, every name remembered; and a refresh during the run ends it, so no file of the old
    snapshot is armed after the refresh disarmed it (the refresh's own event starts the next)."""
    import threading

    from datahoard.cache_worker.dataset_tuning import Tuning
    from datahoard.cache_worker.fs import DatasetFS
    from datahoard.cache_worker.fusell.session import Context
    from tests.support.fakes.dataset import fake_dataset

    files = {"a.bin": b"a" * 1000, "d/b.bin": b"b" * 2000, "d/c.bin": b"c" * 3000}
    ctx = Context(unique=1, nodeid=1, uid=0, gid=0, pid=1)
    with fake_dataset(tmp_path, files, Tuning(whole_file_max=4096, chunk_size=4096, read_wait=60)) as d:
        for run in ("whole", "refreshed"):
            table = BackingTable(tmp_path / f"log-{run}", _Kernel())
            fs = DatasetFS(d.index, d.cache, d.counters, str(tmp_path / "mnt"), backing=table)
            try:
                for key in files if run == "whole" else ():  # cache every file through the view (misses: not armed)
                    parent = 1
                    *dirs, leaf = key.split("/")
                    for name in dirs:
                        parent = fs.lookup(ctx, parent, name.encode()).nodeid
                    node = fs.lookup(ctx, parent, leaf.encode()).nodeid
                    opened = fs.open(ctx, node, os.O_RDONLY)
                    fs.release(ctx, node, opened.fh, 0)
                    assert fs.read(ctx, node, 0, 0, 1 << 20) == files[key]
                if run == "refreshed":
                    fs.index = _SwappedDuringWalk(fs, d.index)
                armed, names = fs.arm_ahead(threading.Event())
                if run == "whole":
                    assert (armed, names, table.armed_count()) == (3, 4, 3)
                else:
                    assert (armed, names, table.armed_count()) == (0, 0, 0)
            finally:
                fs.destroy()
                fs.stop_counting()
                table.close()
