"""The direct tree's layout on disk: what the cache worker writes and the CSI node plugin reads.

A worker started with ``--direct`` serves a fully cached dataset as plain read-only files
(``cache_worker/tree.py`` builds them). The two sides meet only on the node's disk, under the
Dataset's cache directory (``names.cache_dir``)::

    CACHE_DIR/direct/<id>/                  the tree; <id>: 16 hex digits naming the snapshot
    CACHE_DIR/direct/<id>.json              its manifest, written before the tree is renamed
                                            into place: a tree without one was never published
    CACHE_DIR/direct/<id>.refs/<digest>     one file per CSI target that binds the tree (the
                                            digest names the target); the worker never deletes
                                            a tree that has one
    CACHE_DIR/direct/.building-<id>-<pid>   a tree being built; discarded at the next start

The worker's mount record (``datahoard.runtime``) names the ready tree; the plugin accepts it
only in this shape, inside that Dataset's own cache directory (:func:`in_cache`), with its
manifest (:func:`is_complete`), so a record can never make the plugin bind another host directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from . import names

DIRECT_DIR = "direct"
BUILDING_PREFIX = ".building-"
#: Hex digits in a tree's id (a truncated SHA-256 of the index snapshot).
ID_DIGITS = 16

_ID = re.compile(rf"[0-9a-f]{{{ID_DIGITS}}}")


def direct_dir(cache_dir: str | os.PathLike) -> Path:
    """Where a cache directory keeps its direct trees."""
    return Path(cache_dir) / DIRECT_DIR


def tree_id(path: str | os.PathLike) -> str | None:
    """The tree's id if *path* has the shape of a direct tree (``.../direct/<id>``), else None.

    Also answers for a mountinfo root: a bind whose root is a tree is a tree's bind.
    """
    head, _, tail = os.fspath(path).rstrip("/").rpartition("/")
    return tail if head.endswith("/" + DIRECT_DIR) and _ID.fullmatch(tail) else None


def building_path(direct: Path, tid: str, pid: int) -> Path:
    return direct / f"{BUILDING_PREFIX}{tid}-{pid}"


def manifest_path(tree: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(tree)}.json")


def refs_dir(tree: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(tree)}.refs")


def tree_ids_on_disk(direct: Path) -> set[str]:
    """Ids with anything on disk (tree, manifest or references); not what is being built."""
    ids = set()
    for entry in os.scandir(direct):
        name = entry.name
        if name.startswith("."):
            continue
        if name.endswith(".json") or name.endswith(".refs"):
            ids.add(name[:-5])
        elif entry.is_dir(follow_symlinks=False):
            ids.add(name)
    return ids


# -- references: the CSI plugin's side ------------------------------------------------------------
def ref_path(tree: str | os.PathLike, target: str) -> Path:
    digest = hashlib.sha256(target.encode()).hexdigest()[:24]
    return refs_dir(tree) / digest


def add_ref(tree: str | os.PathLike, target: str) -> None:
    """Tell the worker that *target* binds *tree*: it must not delete the tree."""
    path = ref_path(tree, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(target + "\n")
    os.replace(tmp, path)


def drop_ref(tree: str | os.PathLike, target: str) -> None:
    ref_path(tree, target).unlink(missing_ok=True)


def has_refs(tree: str | os.PathLike) -> bool:
    """Whether any CSI target still binds *tree* (the worker's side of the references)."""
    try:
        return any(refs_dir(tree).iterdir())
    except OSError:
        return False


# -- finding a Dataset's tree ----------------------------------------------------------------------
def in_cache(path: str, cache_dir: str | os.PathLike) -> bool:
    """Whether *path* is a direct tree of the cache directory *cache_dir* (no disk access but
    resolving *cache_dir*)."""
    return tree_id(path) is not None and os.path.dirname(path) == os.path.realpath(direct_dir(cache_dir))


def is_complete(tree: str | os.PathLike) -> bool:
    """A published tree: the directory and its manifest (written before the rename) exist."""
    return os.path.isdir(tree) and manifest_path(tree).is_file()


def dataset_of_tree(tree: str, host_root: Path) -> tuple[str, str] | None:
    """(namespace, name) of the Dataset whose cache (``names.cache_dir``) holds *tree*."""
    cache_root = os.path.join(os.path.realpath(names.cache_root(host_root)), "")
    if tree_id(tree) is None or not tree.startswith(cache_root):
        return None
    parts = tree[len(cache_root):].split("/")
    if len(parts) != 4 or parts[2] != DIRECT_DIR:
        return None
    return parts[0], parts[1]
