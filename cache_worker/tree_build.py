"""Building the current snapshot's direct tree.

Every chunk of the snapshot is *pinned* for the tree first (eviction skips them: evicting a
linked chunk would free nothing), and all must be cached. The tree is built in
``direct/.building-<id>-<pid>``: directories (empty ones included, 0555, or 0500 for a private
view, with the snapshot's mtime), then every entry (``tree_entries.py``), then the manifest, and
it is renamed into place last, so a crash leaves a building directory, discarded at the next
start, never a half tree under a published name. A part of :class:`.tree.DirectTrees`, which
sets up the state in ``__init__``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from datahoard import tree_layout

from .keys import shown
from .tree_cleanup import _rmtree
from .tree_entries import _dest, _safe_parts
from .tree_errors import TreeError, _os_error
from .tree_manifest import TreeInfo

log = logging.getLogger("datahoard.cache_worker.tree")  # one log for the direct tree, as before the split

_PIN_BATCH = 5000
#: Linux PATH_MAX, with the terminating NUL.
_PATH_MAX = 4096
#: What the building directory's name adds to the tree's path (``.building-<id>-<pid>``).
_BUILDING_EXTRA = 32


class TreeBuild:
    """Pinning, checking and building.
    A part of :class:`.tree.DirectTrees`, which sets up the state in ``__init__``."""

    def _dir_paths(self) -> list[str]:
        # Index keeps every directory (empty ones included) in memory; parents sort first.
        return sorted(p for p in self.index._dir_paths.values() if p)  # noqa: SLF001

    def files_of(self, info: TreeInfo) -> Iterator[tuple[str, int]]:
        """Every file of the tree ``info`` with its size (what an open of it counts,
        direct_opens.py)."""
        tree = Path(info.path)
        for obj in self.index.walk_files():
            yield str(_dest(tree, obj.key)), obj.size

    def dirs_of_tree(self) -> list[str]:
        """The tree's directories relative to it, "" for itself."""
        return ["", *self._dir_paths()]

    def build(self, stop: threading.Event | None = None) -> TreeInfo:
        """Build the tree of the current snapshot and make it ``current``; raises TreeError
        (nothing left behind)."""
        tree_id = self.id
        tmp = tree_layout.building_path(self.root, tree_id, os.getpid())
        _rmtree(tmp)
        self._assembling_begins(tree_id, tmp)  # a chunk found corrupt from now on is placed again
        try:
            files, total = self._pin_and_check(tree_id, stop)
            tmp.mkdir()
            dirs = self._dir_paths()
            for rel in dirs:
                _dest(tmp, rel).mkdir()
            for obj in self.index.walk_files():
                if stop is not None and stop.is_set():
                    raise TreeError("stopped")
                self._place(obj, tmp, fresh=True)
            info = TreeInfo(id=tree_id, path=str(self.tree_path(tree_id)), files=files, dirs=len(dirs) + 1,
                            bytes=total, assembled_bytes=0, built_at=time.time())

            def publish() -> None:
                self._seal_dirs(tmp, dirs)
                self._write_manifest(info)
                os.rename(tmp, self.tree_path(tree_id))

            self._assembled(info, tmp, publish)
        except BaseException as exc:
            self._assembling_failed()
            _rmtree(tmp)
            self._manifest(tree_id).unlink(missing_ok=True)
            self.store.unpin(tree_id)
            if isinstance(exc, TreeError):
                raise
            if isinstance(exc, OSError):
                raise TreeError(f"building the direct tree failed: {_os_error(exc)}") from exc
            raise
        log.info("built direct tree %s: %d files, %d bytes", info.path, files, total)
        return info

    def _pin_and_check(self, tree_id: str, stop: threading.Event | None) -> tuple[int, int]:
        """Pin every chunk of the snapshot for this tree; all must be cached."""
        files = total = missing = 0
        example = ""
        batch: list[tuple[str, str]] = []
        for obj in self.index.walk_files():
            if stop is not None and stop.is_set():
                raise TreeError("stopped")
            _safe_parts(obj.key)
            self._check_length(tree_id, obj.key)
            files += 1
            total += obj.size
            if obj.size == 0:
                continue
            chunks = self.cache.chunks(obj)
            if not all(map(self.store.contains, chunks)) and any(self.store.was_discarded(c.name) for c in chunks):
                # Dropped by a check since the dataset was fully cached: fetched again here,
                # as a corrupt chunk found while building is (tree_entries._ensure_chunk). The
                # store says so with the record's removal, under one lock: no check can drop
                # a chunk in between (the tree's own note of it, in ``_on_discard``, came after
                # the removal, and a build that looked between the two failed: "not fully
                # cached yet", and no tree until something fetched the file again).
                for chunk in chunks:
                    self._ensure_chunk(obj, chunk)
            for chunk in chunks:
                if not self.store.contains(chunk):
                    missing += 1
                    example = example or obj.key
                    break
                batch.append((chunk.name, obj.key))
            if len(batch) >= _PIN_BATCH:
                self.store.pin(tree_id, batch)
                batch.clear()
        self.store.pin(tree_id, batch)
        if missing:
            raise TreeError(f"not fully cached yet: {missing} of {files} files are missing from the cache "
                            f"(for example {shown(example)})")
        return files, total

    def _check_length(self, tree_id: str, rel: str) -> None:
        """Every path of the tree must fit in PATH_MAX, also while it is being built. The index
        leaves out keys that cannot fit under any reasonable prefix (keys.py); this catches an
        index from before that rule, or a cache directory of over 1 KiB."""
        length = len(os.fsencode(self.tree_path(tree_id))) + _BUILDING_EXTRA + 1 + len(
            rel.encode("utf-8", "surrogateescape"))
        if length >= _PATH_MAX:
            raise TreeError(f"{shown(rel)} would be a path of {length} bytes in the direct tree, over Linux's "
                            f"limit of {_PATH_MAX}: list the source again (--refresh) to leave such keys out, "
                            f"or use a shorter --cache-dir")

    def _seal_dirs(self, tree: Path, dirs: list[str]) -> None:
        mtime = int(self.index.summary.built_at * 1e9)
        for rel in reversed(dirs):
            path = _dest(tree, rel)
            os.chmod(path, self._dir_mode)
            os.utime(path, ns=(mtime, mtime))
        os.chmod(tree, self._dir_mode)
        os.utime(tree, ns=(mtime, mtime))
