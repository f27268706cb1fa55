"""The direct tree's layout, the contract between the worker and the CSI plugin (no root)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datahoard import names, tree_layout

TID = "0123456789abcdef"


@pytest.mark.parametrize("path, expected", [
    (f"/var/lib/datahoard/cache/ns/d/direct/{TID}", TID),
    (f"/var/lib/datahoard/cache/ns/d/direct/{TID}/", TID),
    (f"/direct/{TID}", TID),  # a mountinfo root: the path inside the cache's filesystem
    (f"/cache/direct/{TID}/sub", None),  # inside a tree is not a tree
    (f"/cache/direct/{TID[:-1]}", None),
    (f"/cache/direct/{TID.upper()}", None),
    (f"/cache/indirect/{TID}", None),
    (f"/cache/direct/{TID}.json", None),
    (f"/cache/direct/.building-{TID}-7", None),
])
def test_tree_id_is_the_shape_of_a_tree(path, expected):
    assert tree_layout.tree_id(path) == expected


def test_references_are_files_named_by_the_target(tmp_path: Path):
    tree = tmp_path / "direct" / TID
    assert not tree_layout.has_refs(tree)
    tree_layout.add_ref(tree, "/pods/a/mount")
    tree_layout.add_ref(tree, "/pods/a/mount")  # a repeated publish: still one reference
    assert tree_layout.has_refs(tree)
    # The name is on disk across upgrades: a reference written by an older plugin must be found.
    digest = hashlib.sha256(b"/pods/a/mount").hexdigest()[:24]
    assert [p.name for p in (tmp_path / "direct" / f"{TID}.refs").iterdir()] == [digest]
    tree_layout.drop_ref(tree, "/pods/b/mount")  # not there: nothing to do
    tree_layout.drop_ref(tree, "/pods/a/mount")
    tree_layout.drop_ref(tree, "/pods/a/mount")
    assert not tree_layout.has_refs(tree)


def test_a_tree_is_accepted_only_in_its_datasets_cache_with_a_manifest(tmp_path: Path):
    cache = names.cache_dir("ns", "data", tmp_path)
    tree = tree_layout.direct_dir(cache) / TID
    tree.mkdir(parents=True)
    other = names.cache_dir("ns", "other", tmp_path)
    assert tree_layout.in_cache(str(tree), cache)
    assert not tree_layout.in_cache(str(tree), other)
    assert not tree_layout.in_cache(str(cache / "direct" / "not-a-tree"), cache)
    assert not tree_layout.is_complete(tree)  # being published: no manifest yet
    tree_layout.manifest_path(tree).write_text("{}")
    assert tree_layout.is_complete(tree)
    assert tree_layout.dataset_of_tree(str(tree), tmp_path) == ("ns", "data")
    assert tree_layout.dataset_of_tree(str(tmp_path / "elsewhere" / "direct" / TID), tmp_path) is None


def test_ids_on_disk_count_every_part_of_a_tree_but_not_a_build(tmp_path: Path):
    direct = tree_layout.direct_dir(tmp_path)
    direct.mkdir()
    (direct / "a").mkdir()  # a tree directory
    (direct / "b.json").write_text("{}")  # a manifest left alone
    tree_layout.add_ref(direct / "c", "/t")  # references left alone
    tree_layout.building_path(direct, "d", 1).mkdir()
    assert tree_layout.tree_ids_on_disk(direct) == {"a", "b", "c"}
