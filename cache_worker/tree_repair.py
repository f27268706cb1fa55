"""Keeping the current direct tree whole: a reused tree is checked entry by entry against the
cache at start-up, and a chunk found corrupt later (by a read through the FUSE view) has its
tree entries unlinked at once, then refetched and linked again by rename. A part of
:class:`.tree.DirectTrees`, which sets up the state in ``__init__``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from .keys import shown
from .source import RemoteObject
from .tree_build import _PIN_BATCH
from .tree_entries import _dest
from .tree_errors import TreeError, _os_error
from .tree_manifest import TreeInfo

log = logging.getLogger("datahoard.cache_worker.tree")  # one log for the direct tree, as before the split


class TreeRepair:
    """Verifying a reused tree and relinking corrupt entries.
    A part of :class:`.tree.DirectTrees`, which sets up the state in ``__init__``."""

    def verify(self, info: TreeInfo, stop: threading.Event | None = None) -> int:
        """Check every entry of a reused tree against the cache; repair what is wrong.

        Returns how many entries were replaced. Raises TreeError if one cannot be repaired
        (its entry is then gone: a missing file, never wrong bytes).
        """
        tree = Path(info.path)
        self._assembling_begins(info.id, tree)
        try:
            repaired = self._verify(info, stop)
            self._assembled(info, tree, publish=lambda: None)  # already at its name
            return repaired
        except OSError as exc:  # the store cannot pin (its record refuses writes)
            self._assembling_failed()
            raise TreeError(f"verifying the direct tree failed: {_os_error(exc)}") from exc
        except BaseException:
            self._assembling_failed()
            raise

    def _verify(self, info: TreeInfo, stop: threading.Event | None) -> int:
        tree = Path(info.path)
        rows: list[tuple[str, str]] = []
        repaired = 0
        # Built under another privacy policy, maybe: its root decides who can enter the bind.
        os.chmod(tree, self._dir_mode)
        for rel in self._dir_paths():
            if not _dest(tree, rel).is_dir():
                raise TreeError(f"directory {shown(rel)} is missing from the direct tree")
        for obj in self.index.walk_files():
            if stop is not None and stop.is_set():
                raise TreeError("stopped")
            rows.extend((c.name, obj.key) for c in (self.cache.chunks(obj) if obj.size else []))
            if len(rows) >= _PIN_BATCH:
                self.store.pin(info.id, rows)
                rows.clear()
            try:
                repaired += self._place(obj, tree, fresh=False)
            except OSError as exc:
                raise TreeError(f"repairing {shown(obj.key)} in the direct tree failed: {_os_error(exc)}") from exc
        self.store.pin(info.id, rows)
        if repaired:
            log.warning("direct tree %s: %d entries were wrong and have been replaced", info.path, repaired)
        if info.assembled_bytes:  # built before one file per object: its copies are links now
            self._write_manifest(replace(info, assembled_bytes=0))
            self.store.release_external(info.assembled_bytes)
        return repaired

    def _on_discard(self, name: str) -> None:
        """A chunk failed its check (in a FUSE read, arming, any check): its tree entries must
        not serve it. With no tree yet, there is nothing to do: the next build fetches it again
        (the store remembers it, ``was_discarded``). While a tree is being built
        or verified, an entry it already placed would keep the corrupt inode (a hard link
        outlives the cache file's unlink): it is unlinked too, and placed again before the
        tree becomes current (``_assembled``)."""
        with self._discard_lock:
            current = self.current
            if current is None:
                if self._assembling is None:
                    return
                self._assembly_discards.append(name)
                tree_id, tree = self._assembling
            else:
                tree_id, tree = current.id, Path(current.path)
            for pinned_by, rel in self.store.pinned_paths(name):
                if pinned_by != tree_id:
                    continue
                try:
                    _dest(tree, rel).unlink(missing_ok=True)
                except (OSError, TreeError) as exc:
                    log.error("cannot unlink %s from the direct tree: %s", rel, exc)
                if current is None:
                    log.warning("unlinked %s from the direct tree being put together: its chunk was corrupt", rel)
                    continue
                log.warning("unlinked %s from the direct tree: its chunk was corrupt; relinking after a refetch", rel)
                self._repairs.put(rel)
                if self.on_repair is not None:
                    self.on_repair()

    def _assembling_begins(self, tree_id: str, tree: Path) -> None:
        with self._discard_lock:
            self._assembling, self._assembly_discards = (tree_id, tree), []

    def _assembled(self, info: TreeInfo, tree: Path, publish: Callable[[], None]) -> None:
        """Place again every entry whose chunk was found corrupt while ``tree`` was put together,
        then ``publish`` it and make it current, with no discard in between: from then on a
        discard unlinks from the current tree. Until the loop finds nothing new, the tree is
        not current (and a new build's tree is not even at its name)."""
        while True:
            with self._discard_lock:
                names, self._assembly_discards = self._assembly_discards, []
                if not names:
                    publish()
                    self.current = info
                    self._assembling = None
                    return
            for name in names:
                for pinned_by, rel in self.store.pinned_paths(name):
                    obj = self.index.lookup(rel) if pinned_by == info.id else None
                    if isinstance(obj, RemoteObject):
                        self._place(obj, tree, fresh=False)  # refetched (tree_entries._ensure_chunk)
                        log.info("placed %s again in the direct tree: its chunk was found corrupt", rel)

    def _assembling_failed(self) -> None:
        with self._discard_lock:
            self._assembling, self._assembly_discards = None, []

    def pending_repairs(self) -> Iterator[str]:
        """Entries unlinked by ``_on_discard`` since the last call (``on_repair`` tells when)."""
        while True:
            try:
                yield self._repairs.get_nowait()
            except queue.Empty:
                return

    def repair(self, rel: str) -> tuple[str, int] | None:
        """Refetch and relink one entry of the current tree (after ``_on_discard``); its path
        and size (a new inode: direct_opens.py learns it), or None when there was nothing to do."""
        current = self.current
        if current is None:
            return None
        obj = self.index.lookup(rel)
        if not isinstance(obj, RemoteObject):
            return None
        self._place(obj, Path(current.path), fresh=False)
        log.info("relinked %s in the direct tree", rel)
        return str(_dest(Path(current.path), rel)), obj.size
