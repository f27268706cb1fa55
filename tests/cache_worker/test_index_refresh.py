"""A refreshed index keeps the ids of what did not change (index_refresh.py), without root."""

from datahoard.cache_worker.fs_ids import FILE_BASE
from datahoard.cache_worker.index import Index, build_index_from
from datahoard.cache_worker.index_refresh import build_continuing, high_water
from datahoard.cache_worker.source import RemoteObject

T = 1_700_000_000.0


def objs(spec: dict[str, tuple[int, str]]) -> list[RemoteObject]:
    return [RemoteObject(key, size, etag, T) for key, (size, etag) in spec.items()]


def ids(index: Index) -> dict[str, int]:
    """path -> node-id-like id: directories by their id, files by FILE_BASE + rowid."""
    out: dict[str, int] = {}

    def walk(dir_id: int, prefix: str) -> None:
        for name, is_dir, ident, _ in index.entries(dir_id):
            path = prefix + name
            out[path] = ident if is_dir else FILE_BASE + ident
            if is_dir:
                walk(ident, path + "/")
    walk(1, "")
    return out


FIRST = {"a/1": (10, "e1"), "a/2": (20, "e2"), "b/3": (30, "e3"), "c/d/4": (40, "e4"), "top": (5, "e5")}


def first_index(tmp_path):
    path = tmp_path / "index.db"
    build_index_from(objs(FIRST), "mem://x/", path, snapshot="1" * 64)
    return path, Index(path)


def refresh(tmp_path, old_path, old, spec, snapshot="2" * 64):
    dest = tmp_path / "next.db"
    summary, diff = build_continuing(old, old_path, objs(spec), "mem://x/", dest, snapshot=snapshot)
    return summary, diff, Index(dest)


def test_unchanged_paths_keep_their_ids_and_new_ones_get_fresh_ids(tmp_path):
    old_path, old = first_index(tmp_path)
    before = ids(old)
    spec = dict(FIRST)
    spec["a/1"] = (11, "e1b")      # replaced
    del spec["b/3"]                # removed (and b/ with it)
    del spec["c/d/4"]
    spec["c/d/5"] = (50, "e6")     # new file in a kept directory
    spec["n/6"] = (60, "e7")       # new file in a new directory
    summary, diff, new = refresh(tmp_path, old_path, old, spec)
    after = ids(new)

    assert after["a/2"] == before["a/2"] and after["top"] == before["top"]
    assert after["a"] == before["a"] and after["c/d"] == before["c/d"]
    assert after["a/1"] != before["a/1"]
    mark = max(max(before.values()) - FILE_BASE, max(v for v in before.values() if v < FILE_BASE))
    for path in ("a/1", "c/d/5", "n/6"):
        assert after[path] - FILE_BASE > mark, path
    assert after["n"] > mark and after["n"] not in before.values()
    assert "b" not in after and "b/3" not in after

    assert (diff.added_files, diff.changed_files, diff.removed_files) == (2, 1, 2)
    assert (diff.added_dirs, diff.removed_dirs) == (1, 1)
    assert diff.added_bytes == 11 + 50 + 60
    stale = {(parent, name) for parent, name in diff.stale_names}
    assert (before["a"], "1") in stale        # replaced: the old dentry must go
    assert (before["c/d"], "4") in stale      # removed
    assert (1, "b") in stale                  # a removed directory
    assert (before["a"], "2") not in stale

    assert summary.snapshot == "2" * 64 and summary.files == 5
    assert summary.lineage == old.summary.identity() and summary.identity() == old.summary.identity()
    assert new.file(after["a/1"] - FILE_BASE).etag == "e1b"
    assert new.file(before["a/1"] - FILE_BASE) is None


def test_ids_never_come_back_after_a_file_is_removed_and_added_again(tmp_path):
    """An id the kernel may still hold (an open descriptor of a removed file) is never reused."""
    old_path, old = first_index(tmp_path)
    gone = ids(old)["top"]
    without = {k: v for k, v in FIRST.items() if k != "top"}
    _, _, middle = refresh(tmp_path, old_path, old, without)
    middle_path = tmp_path / "middle.db"
    (tmp_path / "next.db").rename(middle_path)
    middle.retire(middle_path)
    newcomer = dict(without, other=(7, "e9"))
    _, diff, last = build_then_open(tmp_path, middle, middle_path, newcomer)
    assert ids(last)["other"] != gone
    assert ids(last)["other"] - FILE_BASE > gone - FILE_BASE
    assert high_water(tmp_path / "last.db") >= ids(last)["other"] - FILE_BASE


def build_then_open(tmp_path, old, old_path, spec):
    dest = tmp_path / "last.db"
    summary, diff = build_continuing(old, old_path, objs(spec), "mem://x/", dest, snapshot="3" * 64)
    return summary, diff, Index(dest)


def test_nothing_changed_is_an_empty_diff_with_every_id_kept(tmp_path):
    old_path, old = first_index(tmp_path)
    _, diff, new = refresh(tmp_path, old_path, old, FIRST)
    assert diff.empty and not diff.stale_names
    assert ids(new) == ids(old)


def test_refresh_over_the_live_index_file_keeps_the_old_index_readable(tmp_path):
    """The new index is renamed over the old one's name; the old Index, retired to a second
    name first, still answers (new threads open connections too)."""
    import threading

    old_path, old = first_index(tmp_path)
    a2 = ids(old)["a/2"]
    retired = tmp_path / "index.db.retired"
    import os
    os.link(old_path, retired)
    old.retire(retired)
    summary, diff = build_continuing(old, old_path, objs({"z": (1, "ez")}), "mem://x/", old_path,
                                     snapshot="4" * 64)
    seen = []
    t = threading.Thread(target=lambda: seen.append(old.file(a2 - FILE_BASE)))
    t.start()
    t.join()
    assert seen[0] is not None and seen[0].key == "a/2"
    assert Index(old_path).summary.snapshot == "4" * 64
    assert diff.removed_files == 5 and diff.added_files == 1


def test_a_failed_listing_keeps_nothing(tmp_path):
    old_path, old = first_index(tmp_path)

    def broken():
        yield RemoteObject("x", 1, "e", T)
        raise OSError("listing cut")
    try:
        build_continuing(old, old_path, broken(), "mem://x/", tmp_path / "next.db")
    except OSError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.db"]
