"""Where the chunk store keeps what: object ids, chunk names, chunk geometry, and paths.

**Layout.** Every cached object lives in one file ``data/<id[:2]>/<id>``; its chunk ``i`` is
the byte range ``[i * chunk_size, ...)`` of that file (a small object is one chunk, the whole
file). One file per object is what FUSE passthrough needs: the kernel is handed *one* backing
file per open file (:meth:`ChunkStore.backing_fd`), so a large object must be whole in one file.
A large object not yet whole is a sparse file. ``chunks.db`` keeps one record per chunk (where
it is, its size, CRC32, last use), so verification, LRU and capacity accounting stay per chunk,
and one row per object (its size, and the whole-object verification of :mod:`.store_backing`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ChunkId:
    object_id: str
    index: int
    #: Where the chunk starts in its object's file, the object's size (0: the object is this
    #: one chunk) and the chunk's own size (0: not said). Not part of the identity: the name
    #: fixes them for one chunk size, and a cached chunk whose record disagrees with a stated
    #: size was cut with another chunk size (see ``_read_chunk`` in store_read.py).
    offset: int = field(default=0, compare=False)
    object_size: int = field(default=0, compare=False)
    size: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        return f"{self.object_id}.{self.index}"


def chunk_of(oid: str, object_size: int, index: int, chunk_size: int) -> ChunkId:
    """Chunk ``index`` of an object of ``object_size`` bytes cut in chunks of ``chunk_size``."""
    start = index * chunk_size
    return ChunkId(oid, index, start, object_size, max(0, min(chunk_size, object_size - start)))


def object_id(key: str, etag: str, size: int) -> str:
    """Stable name of one version of one object."""
    return hashlib.sha256(f"{key}\0{etag}\0{size}".encode("utf-8", "surrogateescape")).hexdigest()[:40]


def split_name(name: str) -> tuple[str, int]:
    """(object id, chunk index) of a chunk name."""
    oid, _, index = name.rpartition(".")
    return oid, int(index)


def name_range(oid: str) -> tuple[str, str]:
    """Bounds of the chunk names of ``oid`` (``oid.<n>``; ``/`` sorts right after ``.``)."""
    return oid + ".", oid + "/"


class StorePaths:
    """Where an object's file lives.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

    def _path(self, oid: str) -> Path:
        return self._data / oid[:2] / oid

    def backing_path(self, oid: str) -> str:
        """Where the object's whole file lives (passthrough_native.py checks it by path)."""
        return self._file(oid)

    def _file(self, oid: str) -> str:
        """``_path`` as a string, for the hot paths: a ``Path`` costs 7 us to build and makes
        ``os.open`` 5x slower (measured on the test machine), more than the open itself."""
        return f"{self._data_s}/{oid[:2]}/{oid}"

    def path(self, object_id: str) -> Path:
        """Where object ``object_id``'s file lives (it may not exist)."""
        return self._path(object_id)
