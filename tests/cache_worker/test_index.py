"""Index building rules, on an in-memory listing (the S3 listing itself is tested over HTTP)."""

import json
import subprocess
import sys

from datahoard.cache_worker.index import DirEntry, Index, build_index, read_summary
from datahoard.cache_worker.keys import KeyFilter
from datahoard.cache_worker.source import RemoteObject, Source


class ListedSource(Source):
    def __init__(self, keys: dict[str, int]) -> None:
        self.uri = "mem://test/"
        self._keys = keys

    def list(self):
        for key, size in self._keys.items():
            yield RemoteObject(key, size, f"etag-{key}", 1_700_000_000.0)

    def stat(self, key):
        raise NotImplementedError

    def read(self, obj, start, length):
        raise NotImplementedError


def build(tmp_path, keys, key_filter=KeyFilter()):
    path = tmp_path / "index.db"
    summary = build_index(ListedSource(keys), path, key_filter)
    return summary, Index(path)


def test_lookup_and_listdir(tmp_path):
    summary, index = build(tmp_path, {"a/1.jpg": 10, "a/2.jpg": 20, "b/c/3.jpg": 30, "top": 5, "empty/": 0})
    assert (summary.files, summary.total_bytes) == (4, 65)
    assert index.lookup("a/2.jpg") == RemoteObject("a/2.jpg", 20, "etag-a/2.jpg", 1_700_000_000.0)
    assert index.lookup("b/c") == DirEntry("b/c")
    assert index.lookup("") == DirEntry("")
    assert index.lookup("a/3.jpg") is None
    assert index.lookup("nope/x") is None
    assert sorted(index.listdir("")) == [("a", True), ("b", True), ("empty", True), ("top", False)]
    assert sorted(index.listdir("empty")) == []
    assert [o.key for o in index.walk_files()] == ["top", "a/1.jpg", "a/2.jpg", "b/c/3.jpg"]


def test_unsafe_keys_are_skipped_and_counted(tmp_path):
    summary, index = build(tmp_path, {"ok": 1, "../up": 1, "a//b": 1, "/abs": 1, "x/./y": 1})
    assert summary.files == 1
    assert summary.skipped_keys == 4
    assert sorted(index.listdir("")) == [("ok", False)]


def test_directory_wins_over_file_of_same_name(tmp_path):
    # Listing order puts "a" before "a.txt" before "a/b": both orders of conflict are covered.
    summary, index = build(tmp_path, {"a": 1, "a.txt": 2, "a/b": 3, "z/y": 4, "z": 5})
    assert summary.shadowed_files == 2
    assert index.lookup("a") == DirEntry("a")
    assert index.lookup("a/b").size == 3
    assert index.lookup("z") == DirEntry("z")
    assert index.lookup("a.txt").size == 2
    assert summary.files == 3


def test_filters_select_files(tmp_path):
    summary, index = build(tmp_path, {"n1/x.JPEG": 1, "n1/x.txt": 1, "n2/_tmp/y.JPEG": 1},
                           KeyFilter(("**/*.JPEG",), ("**/_tmp/**",)))
    assert [o.key for o in index.walk_files()] == ["n1/x.JPEG"]
    assert summary.filter == {"include": ["**/*.JPEG"], "exclude": ["**/_tmp/**"]}


def test_summary_persists_and_rebuild_is_atomic(tmp_path):
    build(tmp_path, {"a": 1})
    assert read_summary(tmp_path / "index.db").files == 1
    assert not (tmp_path / "index.db.building").exists()
    assert read_summary(tmp_path / "missing.db") is None
    (tmp_path / "junk.db").write_bytes(b"not sqlite")
    assert read_summary(tmp_path / "junk.db") is None


_MANY_THREADS = """
import json, sys, threading
from pathlib import Path
from datahoard.cache_worker.index import Index, build_index
from datahoard.cache_worker.source import RemoteObject

class Listing:
    uri = "mem://rss/"
    def list(self):
        for i in range(200_000):
            d, f = divmod(i, 1000)
            yield RemoteObject(f"train/n{d:08d}/n{d:08d}_{f:07d}.JPEG", 110_000, f"{i:032x}", 1.7e9)
    def close(self):
        pass

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

path = Path(sys.argv[1])
build_index(Listing(), path)
index = Index(path)
train = index.child_dir(1, "train")
ids = [index.child_dir(train, f"n{d:08d}") for d in range(200)]
before = rss()
def read(k):
    for i in range(k, k + 25):
        index.entries(ids[i % len(ids)])
threads = [threading.Thread(target=read, args=(k * 5,)) for k in range(40)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"growth": rss() - before}))
"""


def test_many_threads_reading_the_index_stay_small(tmp_path):
    """The view reads the index from every FUSE thread (80 by default), each with its own SQLite
    connection: with SQLite's default 2 MiB page cache per connection a walk of a large view grew
    the worker by ~2 MiB per thread (40 threads here: 77 MB; with the bounded cache 26 MB)."""
    done = subprocess.run([sys.executable, "-c", _MANY_THREADS, str(tmp_path / "index.db")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = json.loads(done.stdout)["growth"]
    assert growth < 50e6, f"40 threads reading a 200,000-file index grew the process by {growth / 1e6:.0f} MB"
