"""Node ids and file handles of the dataset's FUSE view, and the objects behind file ids.

**Node ids and handles mean the same thing in the next process.** A directory's node id is
its id in the index (the root is 1, as FUSE wants), a file's is :data:`FILE_BASE` plus its
rowid in the index; the index is immutable for the life of a mount, so a worker that resumes
the connection after a restart answers the kernel's old ids correctly. A file handle carries
what a read needs to know up front (:data:`PREPAID` in its low bit); everything else a handle
remembers (where a sequential reader is, for read-ahead) is rebuilt from the node id when a
read arrives with a handle this process never gave out.
"""

from __future__ import annotations

import errno

from .fusell.model import FuseError
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
            if obj is None:
                raise FuseError(errno.ENOENT)
            self._remember(nodeid, obj)
        return obj

    def _remember(self, nodeid: int, obj: RemoteObject) -> None:
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[nodeid] = obj
