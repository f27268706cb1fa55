"""Serving a fully cached dataset with no userspace hop: a read-only tree of hard links.

Once every file of the index snapshot is in the cache, the FUSE view only adds cost: each open
and release is a trip through this process. A *direct tree* is the same view as plain files on
the cache's filesystem, under ``CACHE_DIR/direct/<snapshot id>/``:

* every object is a hard link to its cache file (the store keeps one file per object, its
  chunks at their offsets), so the tree costs no space; every chunk is CRC-verified
  (``ChunkStore.verify``) before the file is linked, and a chunk that fails is refetched
  (trees built before that layout held copies of large files: ``TreeInfo.assembled_bytes``);
* zero-byte objects are empty files, empty directories are included; files are 0444,
  directories 0555 (0400 and 0500 for a private view, one without ``allow_other``: the tree
  is bound over the mountpoint and must refuse whom the view refuses), and mtimes are what the FUSE view shows (the object's for files, the
  snapshot's for directories). Paths come from the index, which only admits keys that are
  safe paths; every path is checked again here, so nothing can land outside the tree.

The layout on disk (``direct/<id>``, ``<id>.json``, ``<id>.refs/``) is the contract with the CSI
node plugin and lives in ``datahoard.tree_layout``; binding a tree over the mountpoint is
``tree_bind.py``. The tree is built in ``direct/.building-<id>-<pid>`` and renamed into place
after its manifest (``direct/<id>.json``) is written, so a crash leaves a building directory,
discarded at the next start, never a half tree under a published name. Chunks linked into a tree are *pinned*
in the store: eviction skips them (evicting a linked chunk would free nothing).

A tree may be bind-mounted into pods, so it is never deleted while anything may reference it:
old trees (from an earlier snapshot) are removed only when no mount in this process's or
pid 1's mount table has them as their root and no CSI reference file
(``direct/<id>.refs/*``) names them. A chunk found corrupt later (by a read through the FUSE
view, or the verification of a reused tree at start-up) has its tree entries unlinked at once,
then refetched and linked again by rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from datahoard import tree_layout
from datahoard.mounts import MountEntry, read_mountinfo

from .dataset import DatasetCache
from .index import Index
from .keys import shown
from .source import RemoteObject
from .store import ChunkId

log = logging.getLogger(__name__)

_PIN_BATCH = 5000
#: Linux PATH_MAX, with the terminating NUL.
_PATH_MAX = 4096
#: What the building directory's name adds to the tree's path (``.building-<id>-<pid>``).
_BUILDING_EXTRA = 32


class TreeError(Exception):
    """The tree cannot be built or kept; the message says why (shown in stats and status)."""


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


def snapshot_id(index: Index) -> str:
    """Names one listing snapshot: a new listing (``--refresh``) gets a new tree."""
    summary = {f: getattr(index.summary, f) for f in index.summary.__slots__}
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:tree_layout.ID_DIGITS]


def _safe_parts(rel: str) -> list[str]:
    """The components of an index path, refusing anything that could leave the tree."""
    parts = rel.split("/") if rel else []
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(part.encode("utf-8", "surrogateescape")) > 255:
            raise TreeError(f"refusing unsafe path {shown(rel)} in the index")
    return parts


def _os_error(exc: OSError) -> str:
    """An OSError in one readable line (its file name can be a path of several KiB)."""
    where = f": {shown(exc.filename)}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _dest(tree: Path, rel: str) -> Path:
    dest = tree.joinpath(*_safe_parts(rel))
    root = os.path.join(os.path.normpath(tree), "")
    assert os.path.normpath(dest).startswith(root) or os.path.normpath(dest) == os.path.normpath(tree), rel
    return dest


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


class DirectTrees:
    """Builds, verifies, repairs and removes the direct trees of one cache directory."""

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
        self.store.on_discard = self._on_discard

    # -- names -----------------------------------------------------------------------------
    def tree_path(self, tree_id: str) -> Path:
        return self.root / tree_id

    def _manifest(self, tree_id: str) -> Path:
        return tree_layout.manifest_path(self.tree_path(tree_id))

    def refs_dir(self, tree_id: str) -> Path:
        return tree_layout.refs_dir(self.tree_path(tree_id))

    def _trees_on_disk(self) -> set[str]:
        return tree_layout.tree_ids_on_disk(self.root)

    def load(self, tree_id: str) -> TreeInfo | None:
        """A complete tree on disk (directory and manifest), or None."""
        try:
            info = TreeInfo(**json.loads(self._manifest(tree_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return info if self.tree_path(tree_id).is_dir() else None

    # -- start-up --------------------------------------------------------------------------
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

    # -- building ---------------------------------------------------------------------------
    def _dir_paths(self) -> list[str]:
        # Index keeps every directory (empty ones included) in memory; parents sort first.
        return sorted(p for p in self.index._dir_paths.values() if p)  # noqa: SLF001

    def build(self, stop: threading.Event | None = None) -> TreeInfo:
        """Build the tree of the current snapshot; raises TreeError (nothing left behind)."""
        tree_id = self.id
        tmp = tree_layout.building_path(self.root, tree_id, os.getpid())
        _rmtree(tmp)
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
            self._seal_dirs(tmp, dirs)
            info = TreeInfo(id=tree_id, path=str(self.tree_path(tree_id)), files=files, dirs=len(dirs) + 1,
                            bytes=total, assembled_bytes=0, built_at=time.time())
            self._write_manifest(info)
            os.rename(tmp, self.tree_path(tree_id))
        except BaseException as exc:
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
            for chunk in self.cache.chunks(obj):
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

    # -- reuse and repair -------------------------------------------------------------------
    def verify(self, info: TreeInfo, stop: threading.Event | None = None) -> int:
        """Check every entry of a reused tree against the cache; repair what is wrong.

        Returns how many entries were replaced. Raises TreeError if one cannot be repaired
        (its entry is then gone: a missing file, never wrong bytes).
        """
        try:
            return self._verify(info, stop)
        except OSError as exc:  # the store cannot pin (its record refuses writes)
            raise TreeError(f"verifying the direct tree failed: {_os_error(exc)}") from exc

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

    def _write_manifest(self, info: TreeInfo) -> None:
        manifest = self.root / f"{tree_layout.BUILDING_PREFIX}{info.id}.json"
        with open(os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.store.file_mode), "w") as out:
            out.write(json.dumps(asdict(info)))
        os.replace(manifest, self._manifest(info.id))

    def _on_discard(self, name: str) -> None:
        """A chunk failed its check (in a FUSE read): its tree entries must not serve it."""
        current = self.current
        if current is None:
            return
        for tree_id, rel in self.store.pinned_paths(name):
            if tree_id != current.id:
                continue
            try:
                _dest(Path(current.path), rel).unlink(missing_ok=True)
            except (OSError, TreeError) as exc:
                log.error("cannot unlink %s from the direct tree: %s", rel, exc)
            log.warning("unlinked %s from the direct tree: its chunk was corrupt; relinking after a refetch", rel)
            self._repairs.put(rel)

    def pending_repairs(self) -> Iterator[str]:
        while True:
            try:
                yield self._repairs.get_nowait()
            except queue.Empty:
                return

    def repair(self, rel: str) -> None:
        """Refetch and relink one entry of the current tree (after ``_on_discard``)."""
        current = self.current
        if current is None:
            return
        obj = self.index.lookup(rel)
        if not isinstance(obj, RemoteObject):
            return
        self._place(obj, Path(current.path), fresh=False)
        log.info("relinked %s in the direct tree", rel)


__all__ = ["DirectTrees", "TreeError", "TreeInfo", "snapshot_id"]


