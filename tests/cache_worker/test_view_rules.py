"""The FUSE view's rules without /dev/fuse: DatasetFS's methods called as the session would,
over a real index and cache in a temporary directory and the in-memory store.

Pinned here: which errno each wrong request gets (ENOENT, ENOTDIR, EISDIR, EROFS, ENOSYS,
EIO, never wrong bytes), and hit accounting (an open answered from the cache counts the file
whole, once; reads of that handle are not counted again, and bytes they had to fetch move from
the cache column to the source column; an uncached file is counted read by read). Passthrough
(a BackingTable on a live connection) needs the kernel and is covered by the FUSE tests.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datahoard.cache_worker.counters import Counters
from datahoard.cache_worker.dataset import DatasetCache
from datahoard.cache_worker.dataset_tuning import Tuning
from datahoard.cache_worker.fs import DatasetFS
from datahoard.cache_worker.fs_ids import FILE_BASE, PREPAID
from datahoard.cache_worker.fusell.session import Context, FuseError
from datahoard.cache_worker.store import ChunkStore
from tests.support.fakes.dataset import fake_dataset
from tests.support.fakes.source import FakeS3

CHUNK = 4096
BUCKET = "view"
CTX = Context(unique=1, nodeid=1, uid=0, gid=0, pid=1)
ROOT = 1

FILES = {
    "small.txt": b"s" * 1000,
    "dir/inner.txt": b"inner",
    "big.bin": bytes(range(256)) * 64,  # 16 KiB: four chunks
}


@dataclass
class View:
    fs: DatasetFS
    s3: FakeS3
    counters: Counters
    store: ChunkStore
    cache: DatasetCache

    def node(self, path: str) -> int:
        parent = ROOT
        *dirs, leaf = path.split("/")
        for name in dirs:
            parent = self.fs.lookup(CTX, parent, name.encode()).nodeid
        return self.fs.lookup(CTX, parent, leaf.encode()).nodeid

    def cat(self, path: str) -> bytes:
        node = self.node(path)
        opened = self.fs.open(CTX, node, os.O_RDONLY)
        try:
            return self.fs.read(CTX, node, opened.fh, 0, 1 << 20)
        finally:
            self.fs.release(CTX, node, opened.fh, 0)

    def served(self) -> tuple[int, int]:
        return self.counters.served_from_cache, self.counters.served_from_source


def fuse_errno(call) -> int:
    with pytest.raises(FuseError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value.errno


@pytest.fixture
def view(tmp_path: Path) -> Iterator[View]:
    with fake_dataset(tmp_path, FILES, Tuning(whole_file_max=CHUNK, chunk_size=CHUNK, read_wait=60), BUCKET) as d:
        fs = DatasetFS(d.index, d.cache, d.counters, str(tmp_path / "mnt"))
        yield View(fs, d.s3, d.counters, d.store, d.cache)


def test_names_resolve_to_directories_and_read_only_files(view):
    entry = view.fs.lookup(CTX, ROOT, b"small.txt")
    assert entry.nodeid >= FILE_BASE and entry.attr.size == 1000
    assert stat.S_ISREG(entry.attr.mode) and entry.attr.mode & 0o222 == 0
    d = view.fs.lookup(CTX, ROOT, b"dir")
    assert d.nodeid < FILE_BASE and stat.S_ISDIR(d.attr.mode)
    attr, _ = view.fs.getattr(CTX, entry.nodeid, None)
    assert attr.size == 1000


def test_metadata_errors(view):
    file_node = view.node("small.txt")
    dir_node = view.node("dir")
    assert fuse_errno(lambda: view.fs.lookup(CTX, ROOT, b"missing")) == errno.ENOENT
    assert fuse_errno(lambda: view.fs.lookup(CTX, file_node, b"x")) == errno.ENOTDIR
    assert fuse_errno(lambda: view.fs.getattr(CTX, 999_999, None)) == errno.ENOENT
    assert fuse_errno(lambda: view.fs.getattr(CTX, FILE_BASE + 999_999, None)) == errno.ENOENT
    assert fuse_errno(lambda: view.fs.opendir(CTX, file_node, 0)) == errno.ENOTDIR
    assert fuse_errno(lambda: view.fs.open(CTX, dir_node, os.O_RDONLY)) == errno.EISDIR
    assert fuse_errno(lambda: view.fs.access(CTX, 999_999, os.R_OK)) == errno.ENOENT


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                                   os.O_WRONLY | os.O_APPEND])
def test_opens_for_writing_are_read_only_filesystem(view, flags):
    assert fuse_errno(lambda: view.fs.open(CTX, view.node("small.txt"), flags)) == errno.EROFS


def test_access_for_writing_is_refused_reading_allowed(view):
    node = view.node("small.txt")
    view.fs.access(CTX, node, os.R_OK)
    view.fs.access(CTX, ROOT, os.R_OK | os.X_OK)
    assert fuse_errno(lambda: view.fs.access(CTX, node, os.W_OK)) == errno.EROFS


def test_readdir_lists_every_entry_and_resumes_at_an_offset(view):
    opened = view.fs.opendir(CTX, ROOT, 0)
    items = list(view.fs.readdir(CTX, ROOT, opened.fh, 0))
    names = {i.name: i for i in items}
    assert set(names) == {b".", b"..", b"small.txt", b"big.bin", b"dir"}
    assert stat.S_ISDIR(names[b"dir"].mode) and stat.S_ISREG(names[b"big.bin"].mode)
    rest = list(view.fs.readdir(CTX, ROOT, opened.fh, 3))
    assert rest == items[3:]
    view.fs.releasedir(CTX, ROOT, opened.fh)  # as the session calls it
    assert view.fs.statfs(CTX, ROOT).files == 3


def test_kernel_opens_mode_answers_enosys(view):
    view.fs.kernel_opens = True
    assert fuse_errno(lambda: view.fs.open(CTX, view.node("small.txt"), os.O_RDONLY)) == errno.ENOSYS


def test_a_failed_read_is_eio_and_counted_never_wrong_bytes(view):
    node = view.node("small.txt")
    opened = view.fs.open(CTX, node, os.O_RDONLY)
    view.s3.put(BUCKET, "small.txt", b"t" * 1000)  # replaced under the mount
    assert fuse_errno(lambda: view.fs.read(CTX, node, opened.fh, 0, 4096)) == errno.EIO
    assert view.counters.errors == 1
    assert "small.txt" in view.counters.last_error and "changed" in view.counters.last_error
    assert view.served() == (0, 0)


def test_an_uncached_small_file_is_counted_when_read_a_cached_one_at_open(view):
    assert view.cat("small.txt") == FILES["small.txt"]
    assert view.served() == (0, 1000)
    node = view.node("small.txt")
    opened = view.fs.open(CTX, node, os.O_RDONLY)
    assert opened.keep_cache and opened.fh & PREPAID
    assert view.served() == (1000, 1000)  # counted whole at open
    assert view.fs.read(CTX, node, opened.fh, 0, 4096) == FILES["small.txt"]
    assert view.served() == (1000, 1000)  # and not again when a read reaches us
    view.fs.release(CTX, node, opened.fh, 0)


def test_a_prepaid_read_that_had_to_fetch_moves_to_the_source_column(view):
    view.cat("small.txt")
    node = view.node("small.txt")
    opened = view.fs.open(CTX, node, os.O_RDONLY)  # counted 1000 from cache
    for chunk in view.cache.chunks(view.fs.index.lookup("small.txt")):
        view.store.discard(chunk.name)  # evicted between the open and a read
    assert view.fs.read(CTX, node, opened.fh, 0, 4096) == FILES["small.txt"]
    assert view.served() == (0, 2000)
    assert len(view.s3.gets("small.txt")) == 2


def test_a_large_file_is_counted_read_by_read(view):
    node = view.node("big.bin")
    opened = view.fs.open(CTX, node, os.O_RDONLY)
    assert not opened.keep_cache and not opened.fh & PREPAID
    data = FILES["big.bin"]
    assert view.fs.read(CTX, node, opened.fh, 100, 200) == data[100:300]
    assert view.served() == (0, 200)
    assert view.fs.read(CTX, node, opened.fh, 300, 100) == data[300:400]
    # The whole object was fetched to check it for the first read; this reader's later reads
    # of those chunks are still bytes from the source, not hits.
    assert view.served() == (0, 300)
    view.fs.release(CTX, node, opened.fh, 0)
    again = view.fs.open(CTX, node, os.O_RDONLY)
    assert view.fs.read(CTX, node, again.fh, 0, 50) == data[:50]
    assert view.served() == (50, 300)


def test_a_handle_from_a_previous_worker_still_reads(view):
    node = view.node("big.bin")
    stale_fh = 12345 << 2  # never given out by this process, not prepaid
    assert view.fs.read(CTX, node, stale_fh, 4096, 10) == FILES["big.bin"][4096:4106]
    assert view.served() == (0, 10)
