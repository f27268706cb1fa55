"""Node ids and file handles of the dataset's FUSE view, and the objects behind file ids.

**Node ids and handles mean the same thing in the next process.** A directory's node id is
its id in the index (the root is 1, as FUSE wants), a file's is :data:`FILE_BASE` plus its
rowid in the index; an index never changes, and a refresh (``take_index``) swaps in one that
keeps every unchanged entry's id and never reuses an id (index_refresh.py), so a worker that
resumes the connection after a restart answers the kernel's old ids correctly. A file handle carries
what a read needs to know up front (:data:`PREPAID` in its low bit); everything else a handle
remembers (where a sequential reader is, for read-ahead) is rebuilt from the node id when a
read arrives with a handle this process never gave out.
"""

from __future__ import annotations

import errno

from .fusell.model import FuseError
from .index import Index
from .source import RemoteObject

#: Files' node ids start here; directories' are their index ids (far below).
FILE_BASE = 1 << 48
#: Bits of a file handle (the rest is a serial number): the open counted the whole file as a
#: hit already; the open was answered with passthrough. Handle 0 is the kernel's own, for reads
#: of files it opened itself (``serve_opens_in_kernel``): prepaid by fanotify's count.
PREPAID = 1
PASSED = 2
_SERIAL_SHIFT = 2
#: Bound on remembered objects (node id -> object), about 200 bytes each.
_KNOWN_MAX = 1 << 16


class ViewIds:
    """Node id -> object, remembered within a bound.
    A part of :class:`.fs.DatasetFS`, which sets up the state in ``__init__``."""

    def _object(self, nodeid: int) -> RemoteObject:
        obj = self._known.get(nodeid)
        if obj is None:
            if nodeid < FILE_BASE:
                raise FuseError(errno.EISDIR if self.index.dir_path(nodeid) is not None else errno.ENOENT)
            obj = self.index.file(nodeid - FILE_BASE)
            if obj is None and self._previous is not None:
                obj = self._previous.file(nodeid - FILE_BASE)  # open before a refresh removed it
            if obj is None:
                raise FuseError(errno.ENOENT)
            self._remember(nodeid, obj)
        return obj

    def take_index(self, index: Index) -> None:
        """Serve ``index`` from now on: a refresh (index_refresh.py, refresh.py).

        Its ids are the old index's wherever nothing changed, so the kernel's dentries, open
        descriptors and page cache of unchanged files stay right. A directory listing is built
        from one index when it starts (``readdir`` at offset 0), so it shows either snapshot,
        never a mix. The index replaced is kept as a fallback for ids it alone knows: a file
        a refresh removed or replaced stays readable through descriptors opened before it
        (their reads are pinned to the listed version, as every read is), until the next
        refresh. Names that lead elsewhere now are the caller's to invalidate in the kernel.
        """
        with self._lock:
            self._previous, self.index = self.index, index
            self._known.clear()
            self._dir_time_ns = int(index.summary.built_at * 1e9)
        if self.native is not None:
            self.native.forget_names()  # after the swap: an answer from the old index is refused

    def _remember(self, nodeid: int, obj: RemoteObject) -> None:
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[nodeid] = obj
