"""Backing ids the dataset's FUSE view keeps across opens (fusell/passthrough_ids.py): which
cache file each id was registered for, whether it is still the one to serve, and closing the
ids of files the store evicted.
"""

from __future__ import annotations

from .source import RemoteObject
from .store import ChunkStore, object_id

#: Backing ids kept registered after their file's last release (fusell/passthrough_ids.py): each
#: holds the kernel's reference to one cache file (no descriptor of ours) until the file is
#: evicted or changed, or more recently released ones push it out.
KEPT_BACKING_IDS = 4096


class ViewBacking:
    """The view's side of kept backing ids.
    A part of :class:`.fs.DatasetFS`, which sets up the state in ``__init__``."""

    def _backing_fd(self, nodeid: int, obj: RemoteObject) -> int | None:
        """The cache file to register for ``nodeid``, remembering which file it was."""
        fd = self.cache.backing_fd(obj)
        if fd is not None:
            oid = object_id(obj.key, obj.etag, obj.size)
            self._backed[nodeid] = (oid, ChunkStore.signature_of(fd))
            self._backed_oids[oid] = nodeid
        return fd

    def _still_backing(self, nodeid: int) -> bool:
        entry = self._backed.get(nodeid)
        return entry is not None and self.cache.store.still_backing(*entry)

    def _backing_closed(self, nodeid: int) -> None:
        """The table closed ``nodeid``'s id (under its lock: dictionary updates only)."""
        entry = self._backed.pop(nodeid, None)
        if entry is not None and self._backed_oids.get(entry[0]) == nodeid:
            del self._backed_oids[entry[0]]

    def _object_gone(self, oid: str) -> None:
        """The store unlinked ``oid``'s file (under its lock): close a kept id for it soon."""
        if oid in self._backed_oids:
            self._gone.put(oid)

    def _close_gone(self) -> None:
        """Closes the ids of files the store evicted, off the store's lock (the table's lock is
        taken before the store's in ``open``). Until it does, the kernel keeps the file's space."""
        while (oid := self._gone.get()) is not None:
            nodeid = self._backed_oids.get(oid)
            if nodeid is not None:
                self.backing.drop(nodeid)
