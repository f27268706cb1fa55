"""A published direct tree's manifest (``direct/<id>.json``): what the tree holds, written last
(after the tree is complete, by a rename) and read back at start-up to decide whether a tree on
disk is one this worker published. A part of :class:`.tree.DirectTrees`, which sets up the
state in ``__init__``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from datahoard import tree_layout


@dataclass(frozen=True)
class TreeInfo:
    id: str
    path: str
    files: int
    dirs: int
    bytes: int
    #: Bytes of files assembled from several chunks: the tree's own space in the cache (0 since
    #: the store keeps one file per object; kept for trees built before).
    assembled_bytes: int
    built_at: float


class TreeManifest:
    """Reading and writing manifests.
    A part of :class:`.tree.DirectTrees`, which sets up the state in ``__init__``."""

    def _manifest(self, tree_id: str) -> Path:
        return tree_layout.manifest_path(self.tree_path(tree_id))

    def load(self, tree_id: str) -> TreeInfo | None:
        """A complete tree on disk (directory and manifest), or None."""
        try:
            info = TreeInfo(**json.loads(self._manifest(tree_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return info if self.tree_path(tree_id).is_dir() else None

    def _write_manifest(self, info: TreeInfo) -> None:
        manifest = self.root / f"{tree_layout.BUILDING_PREFIX}{info.id}.json"
        with open(os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.store.file_mode), "w") as out:
            out.write(json.dumps(asdict(info)))
        os.replace(manifest, self._manifest(info.id))
