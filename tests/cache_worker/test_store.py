"""The chunk store on a real directory: atomic fills, verification, LRU eviction, restart."""

import os
import threading
from pathlib import Path

import pytest

from datahoard.cache_worker.store import CacheFull, ChunkId, ChunkStore
from datahoard.cache_worker.store_trust import signature
from tests.support.polling import eventually


def chunk(n: int) -> ChunkId:
    return ChunkId(f"{n:040x}", 0)


def test_put_read_and_reuse_after_restart(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 20)
    store.put(chunk(1), b"hello world")
    assert store.read(chunk(1), 6, 5) == b"world"
    assert store.used_bytes == 11
    store.close()

    again = ChunkStore(tmp_path, capacity=1 << 20)
    assert again.used_bytes == 11
    assert again.read(chunk(1), 0, 5) == b"hello"
    assert again.read(chunk(2), 0, 5) is None


def _cached_then_corrupted(root) -> Path:
    """A store's file of 1,000 bytes of "A", one byte of it changed behind the store's back."""
    store = ChunkStore(root, capacity=1 << 20)
    store.put(chunk(1), b"A" * 1000)
    store.close()
    path = next((root / "data").rglob(chunk(1).object_id))
    with open(path, "r+b") as f:
        f.seek(500)
        f.write(b"B")
    return path


def test_corrupt_chunk_is_dropped_not_served(tmp_path):
    path = _cached_then_corrupted(tmp_path)
    again = ChunkStore(tmp_path, capacity=1 << 20)
    assert again.read(chunk(1), 0, 1000) is None
    assert not path.exists()
    assert again.used_bytes == 0


def test_truncated_chunk_is_dropped(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 20)
    store.put(chunk(1), b"A" * 1000)
    store.close()
    path = next((tmp_path / "data").rglob(chunk(1).object_id))
    os.truncate(path, 10)
    again = ChunkStore(tmp_path, capacity=1 << 20)
    assert again.read(chunk(1), 0, 10) is None


def test_crash_leftovers_are_cleaned(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 20)
    store.put(chunk(1), b"kept")
    store.close()
    # A fill that died before its rename, and a renamed file whose record never got written.
    (tmp_path / "tmp" / "partial.123").write_bytes(b"half")
    orphan = tmp_path / "data" / "ab" / ("ab" + "0" * 38 + ".0")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")

    again = ChunkStore(tmp_path, capacity=1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not orphan.exists()
    assert again.read(chunk(1), 0, 4) == b"kept"


def test_lru_eviction_keeps_recently_used(tmp_path):
    store = ChunkStore(tmp_path, capacity=3000)
    for n in range(3):
        store.put(chunk(n), bytes(1000))
    assert store.read(chunk(0), 0, 1) == b"\0"  # 0 is now more recent than 1
    store.put(chunk(3), bytes(1000))
    assert store.used_bytes <= 3000
    assert store.contains(chunk(0)) and store.contains(chunk(3))
    assert not store.contains(chunk(1))


def test_chunk_larger_than_capacity(tmp_path):
    store = ChunkStore(tmp_path, capacity=100)
    with pytest.raises(CacheFull, match="exceeds the cache capacity"):
        store.put(chunk(1), bytes(101))
    assert store.used_bytes == 0


def test_a_check_that_lost_the_race_to_drop_a_corrupt_file_leaves_its_refetched_copy(tmp_path):
    """Two checks find the same corrupt file; the first drops it and a fill puts the right
    bytes back. The second then drops nothing: what is on disk is not the file it read (before,
    it compared inodes before taking the object's lock, and dropped the good copy)."""
    good = b"A" * 1000
    path = _cached_then_corrupted(tmp_path)
    store = ChunkStore(tmp_path, capacity=1 << 20)
    oid = chunk(1).object_id
    fd = os.open(path, os.O_RDONLY)
    late = threading.Thread(target=store._check, args=(chunk(1).name, fd, signature(os.fstat(fd))))
    with store._object_lock(oid):  # the first check's drop and refill, under the object's lock
        late.start()
        eventually(lambda: store._object_locks[oid][1] == 2, what="the late check waiting for the object")
        store.discard(chunk(1).name)
        store.put(chunk(1), good)
    late.join()
    os.close(fd)
    assert store.read(chunk(1), 0, 1000) == good
    assert path.exists() and store.used_bytes == 1000
