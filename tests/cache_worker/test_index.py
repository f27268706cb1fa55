"""Index building rules, on an in-memory listing (the S3 listing itself is tested over HTTP)."""

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
