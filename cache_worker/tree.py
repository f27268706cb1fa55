"""Serving a fully cached dataset with no userspace hop: a read-only tree of hard links.

Once every file of the index snapshot is in the cache, the FUSE view only adds cost: each open
and release is a trip through this process. A *direct tree* is the same view as plain files on
the cache's filesystem, under ``CACHE_DIR/direct/<snapshot id>/``: every object a hard link to
its verified cache file (so the tree costs no space), every directory of the view, read-only.

The layout on disk (``direct/<id>``, ``<id>.json``, ``<id>.refs/``) is the contract with the CSI
node plugin and lives in ``datahoard.tree_layout``; binding a tree over the mountpoint is
``tree_bind.py``. :class:`DirectTrees` is put together from one part per job:

- :mod:`.tree_entries`: one entry holding exactly its object's bytes (links, modes, safe paths);
- :mod:`.tree_build`: pinning the snapshot's chunks and building the tree, published by rename;
- :mod:`.tree_manifest`: the manifest that says a tree on disk is complete (:class:`TreeInfo`);
- :mod:`.tree_repair`: checking a reused tree and relinking chunks found corrupt;
- :mod:`.tree_cleanup`: discarding what a crash left and old trees nothing references.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from datahoard import tree_layout

from .dataset import DatasetCache
from .index import Index
from .tree_build import TreeBuild
from .tree_cleanup import TreeCleanup
from .tree_entries import TreeEntries
from .tree_manifest import TreeInfo, TreeManifest
from .tree_repair import TreeRepair


def snapshot_id(index: Index) -> str:
    """Names one listing snapshot: a new listing (``--refresh``) gets a new tree."""
    summary = {f: getattr(index.summary, f) for f in index.summary.__slots__}
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:tree_layout.ID_DIGITS]


class DirectTrees(TreeBuild, TreeRepair, TreeEntries, TreeCleanup, TreeManifest):
    """Builds, verifies, repairs and removes the direct trees of one cache directory (module
    docstring); the methods are in the parts named there."""

    def __init__(self, cache_dir: Path, index: Index, cache: DatasetCache) -> None:
        self.root = tree_layout.direct_dir(cache_dir)
        self.index = index
        self.cache = cache
        self.store = cache.store
        self.id = snapshot_id(index)
        self._file_mode = 0o400 if self.store.private else 0o444
        self._dir_mode = 0o500 if self.store.private else 0o555
        self.root.mkdir(mode=self.store.dir_mode, parents=True, exist_ok=True)
        os.chmod(self.root, self.store.dir_mode)
        #: The tree of the current snapshot once it is complete and verified (then repairs run).
        self.current: TreeInfo | None = None
        self._repairs: queue.Queue[str] = queue.Queue()
        #: Called (on the discarding thread) when an entry waits to be relinked (tree_repair.py).
        self.on_repair: Callable[[], None] | None = None
        #: The tree being built or verified, (id, path), while it is (tree_repair.py); chunks
        #: found corrupt meanwhile (names), whose entries it places again before it is current.
        self._assembling: tuple[str, Path] | None = None
        self._assembly_discards: list[str] = []
        #: Orders a discard against a tree becoming current (``_on_discard``, ``_assembled``).
        self._discard_lock = threading.Lock()
        self.store.on_discard = self._on_discard

    # -- names -----------------------------------------------------------------------------
    def tree_path(self, tree_id: str) -> Path:
        return self.root / tree_id

    def refs_dir(self, tree_id: str) -> Path:
        return tree_layout.refs_dir(self.tree_path(tree_id))

    def _trees_on_disk(self) -> set[str]:
        return tree_layout.tree_ids_on_disk(self.root)


__all__ = ["DirectTrees", "snapshot_id"]
