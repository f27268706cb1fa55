"""What a crash or an old snapshot leaves in ``direct/``, and removing it safely.

A tree may be bind-mounted into pods, so it is never deleted while anything may reference it:
old trees (from an earlier snapshot) are removed only when no mount in this process's or
pid 1's mount table has them as their root and no CSI reference file
(``direct/<id>.refs/*``) names them. A building directory (``direct/.building-<id>-<pid>``)
is what a crash left while building: discarded at the next start. A part of
:class:`.tree.DirectTrees`, which sets up the state in ``__init__``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from datahoard import tree_layout
from datahoard.mounts import MountEntry, read_mountinfo

from .tree_manifest import TreeInfo

log = logging.getLogger("datahoard.cache_worker.tree")  # one log for the direct tree, as before the split


def _rmtree(path: Path) -> None:
    """Remove a tree whose directories are read-only."""
    if not path.exists():
        return
    for dirpath, _dirs, _files in os.walk(path):
        try:
            os.chmod(dirpath, 0o755)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _mount_tables() -> list[MountEntry]:
    """Every mount this process can see: its own table and pid 1's (a tree bound into a pod
    shows in the host's table, not in a worker container's)."""
    seen: list[MountEntry] = []
    for table in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        try:
            seen += read_mountinfo(table)
        except OSError:
            continue
    return seen


class TreeCleanup:
    """Start-up recovery, references, removal.
    A part of :class:`.tree.DirectTrees`, which sets up the state in ``__init__``."""

    def recover(self) -> None:
        """Discard what a crash left (half-built trees), count the space of complete trees,
        drop pins of trees that are gone, and remove old trees nothing references."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(tree_layout.BUILDING_PREFIX):
                log.info("discarding the half-built direct tree %s", entry.name)
                if entry.is_dir(follow_symlinks=False):
                    _rmtree(Path(entry.path))
                else:
                    os.unlink(entry.path)
        on_disk = self._trees_on_disk()
        for tree_id in sorted(on_disk):
            info = self.load(tree_id)
            if info is None and not self._referenced(tree_id):
                # A directory without manifest (or the reverse) is not a tree we published.
                self._remove(tree_id, None)
            elif info is not None:
                self.store.external_bytes += info.assembled_bytes
        for tree_id in self.store.pinned_trees() - self._trees_on_disk():
            self.store.unpin(tree_id)
        self.remove_unused()

    def _referenced(self, tree_id: str) -> bool:
        """A CSI reference file, or a mount of the tree (or of a directory in it) anywhere."""
        path = self.tree_path(tree_id)
        if tree_layout.has_refs(path):
            return True
        suffix = f"/{tree_layout.DIRECT_DIR}/{tree_id}"
        inside = f"{path}/"
        return any(m.root.endswith(suffix) or f"{suffix}/" in m.root or m.source == str(path)
                   or m.source.startswith(inside) for m in _mount_tables())

    def remove_unused(self) -> list[str]:
        """Remove trees of other snapshots that no mount references; returns their ids."""
        removed = []
        for tree_id in sorted(self._trees_on_disk()):
            if tree_id == self.id or self._referenced(tree_id):
                continue
            self._remove(tree_id, self.load(tree_id))
            removed.append(tree_id)
        return removed

    def old_trees(self) -> set[str]:
        """Trees of other snapshots still on disk (``remove_unused`` left them: referenced)."""
        return self._trees_on_disk() - {self.id}

    def discard_current(self) -> bool:
        """Remove the current snapshot's tree (it failed verification) unless it is referenced."""
        if self._referenced(self.id):
            return False
        self._remove(self.id, self.load(self.id))
        return True

    def _remove(self, tree_id: str, info: TreeInfo | None) -> None:
        log.info("removing direct tree %s (no mount references it)", tree_id)
        _rmtree(self.tree_path(tree_id))
        self._manifest(tree_id).unlink(missing_ok=True)
        _rmtree(self.refs_dir(tree_id))
        self.store.unpin(tree_id)
        if info is not None:
            self.store.release_external(info.assembled_bytes)
