"""One entry of a direct tree: a file that holds exactly its object's bytes.

* every object is a hard link to its cache file (the store keeps one file per object, its
  chunks at their offsets), so the tree costs no space; every chunk is CRC-verified
  (``ChunkStore.verify``) before the file is linked, and a chunk that fails is refetched
  (trees built before that layout held copies of large files: ``TreeInfo.assembled_bytes``);
* zero-byte objects are empty files; files are 0444 (0400 for a private view, one without
  ``allow_other``: the tree is bound over the mountpoint and must refuse whom the view
  refuses), and their mtimes are the object's, as the FUSE view shows. Paths come from the
  index, which only admits keys that are safe paths; every path is checked again here, so
  nothing can land outside the tree.

In a fresh tree entries are created in place; in a live one a suspect entry is unlinked first
(wrong bytes must not stay readable), then replaced by rename. A part of
:class:`.tree.DirectTrees`, which sets up the state in ``__init__``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from .keys import shown
from .source import RemoteObject
from .store import ChunkId
from .tree_errors import TreeError

log = logging.getLogger("datahoard.cache_worker.tree")  # one log for the direct tree, as before the split


def _safe_parts(rel: str) -> list[str]:
    """The components of an index path, refusing anything that could leave the tree."""
    parts = rel.split("/") if rel else []
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(part.encode("utf-8", "surrogateescape")) > 255:
            raise TreeError(f"refusing unsafe path {shown(rel)} in the index")
    return parts


def _dest(tree: Path, rel: str) -> Path:
    dest = tree.joinpath(*_safe_parts(rel))
    root = os.path.join(os.path.normpath(tree), "")
    assert os.path.normpath(dest).startswith(root) or os.path.normpath(dest) == os.path.normpath(tree), rel
    return dest


class TreeEntries:
    """Placing, checking and refetching entries.
    A part of :class:`.tree.DirectTrees`, which sets up the state in ``__init__``."""

    def _ensure_chunk(self, obj: RemoteObject, chunk: ChunkId) -> None:
        """The chunk is cached and matches its CRC, refetched if it was missing or corrupt."""
        if self.store.verify(chunk):
            return
        log.warning("chunk of %s failed verification or is missing; refetching it", obj.key)
        try:
            self.cache.fill(obj, chunk, background=True)
        except Exception as exc:  # noqa: BLE001 - becomes the tree's reason
            raise TreeError(f"refetching {shown(obj.key)} failed: {exc}") from exc
        if not self.store.verify(chunk):
            raise TreeError(f"{shown(obj.key)} could not be cached again ({self.cache.counters.degraded or 'cache full?'})")

    def _place(self, obj: RemoteObject, tree: Path, fresh: bool) -> bool:
        """Make ``tree/obj.key`` hold exactly the object's bytes; True if it had to change.

        In a fresh tree entries are created in place; in a live one a suspect entry is
        unlinked first (wrong bytes must not stay readable), then replaced by rename.
        """
        dest = _dest(tree, obj.key)
        mtime = int(obj.mtime * 1e9)
        chunks = self.cache.chunks(obj) if obj.size else []
        if not fresh and self._entry_ok(obj, dest, chunks):
            return False
        if not fresh:
            dest.unlink(missing_ok=True)
        # A hashed temporary name: the entry's own name may already be NAME_MAX long.
        digest = hashlib.sha256(dest.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        out = dest if fresh else dest.with_name(f".dh-{os.getpid()}-{digest}")
        out.unlink(missing_ok=True)
        if obj.size == 0:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode)
            os.close(fd)
        else:
            # A chunk found corrupt drops its whole (complete) object, chunks already ensured
            # too; their refetch brings them back (checked whole up to check_whole_max).
            for _ in range(2):
                for chunk in chunks:
                    self._ensure_chunk(obj, chunk)
                if all(self.store.verify(c) for c in chunks):
                    break
            else:
                raise TreeError(f"{shown(obj.key)} could not be cached whole again "
                                f"({self.cache.counters.degraded or 'cache full?'})")
            os.link(self.store.path(chunks[0].object_id), out)
        os.chmod(out, self._file_mode)
        os.utime(out, ns=(mtime, mtime))
        if out != dest:
            os.replace(out, dest)
        return True

    def _entry_ok(self, obj: RemoteObject, dest: Path, chunks: list[ChunkId]) -> bool:
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != obj.size:
            return False
        if obj.size == 0:
            return True
        try:
            same = os.stat(self.store.path(chunks[0].object_id)).st_ino == st.st_ino
        except FileNotFoundError:
            return False
        # A copy in a tree built before one file per object is replaced by a link.
        return same and all(self.store.verify(c) for c in chunks)
