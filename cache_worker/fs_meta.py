"""The metadata half of the dataset's FUSE view: names, attributes and listings, all answered
from the index (no source, no cache), which is immutable while the view is mounted: hence the
hour-long entry and attribute timeouts, and listings built once per open directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from .fs_ids import _SERIAL_SHIFT, FILE_BASE
from .fusell.model import Attr, Context, DirItem, Entry, FuseError, Opened, StatFs
from .source import RemoteObject

#: Seconds the kernel may trust names and attributes: the view is immutable while mounted.
METADATA_TIMEOUT = 3600.0


class ViewMetadata:
    """LOOKUP, GETATTR, directories, STATFS and ACCESS.
    A part of :class:`.fs.DatasetFS`, which sets up the state in ``__init__``."""

    def _dir_attr(self, nodeid: int) -> Attr:
        t = self._dir_time_ns
        return Attr(ino=nodeid, size=0, mode=stat.S_IFDIR | 0o555, nlink=2, uid=self._uid,
                    gid=self._gid, mtime_ns=t, ctime_ns=t, atime_ns=t, blksize=4096, blocks=0)

    def _file_attr(self, nodeid: int, obj: RemoteObject) -> Attr:
        t = int(obj.mtime * 1e9)
        return Attr(ino=nodeid, size=obj.size, mode=stat.S_IFREG | 0o444, nlink=1, uid=self._uid,
                    gid=self._gid, mtime_ns=t, ctime_ns=t, atime_ns=t, blksize=1 << 20,
                    blocks=-(-obj.size // 512))

    def _entry(self, nodeid: int, attr: Attr) -> Entry:
        return Entry(nodeid=nodeid, attr=attr, entry_timeout=METADATA_TIMEOUT, attr_timeout=METADATA_TIMEOUT)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent >= FILE_BASE:
            raise FuseError(errno.ENOTDIR)
        text = name.decode("utf-8", "surrogateescape")
        child = self.index.child_dir(parent, text)
        if child is not None:
            return self._entry(child, self._dir_attr(child))
        found = self.index.child_file(parent, text)
        if found is None:
            raise FuseError(errno.ENOENT)
        nodeid = FILE_BASE + found[0]
        self._remember(nodeid, found[1])
        return self._entry(nodeid, self._file_attr(nodeid, found[1]))

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Nothing to free: ids are derived from the index, not handed out."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        if nodeid < FILE_BASE:
            if self.index.dir_path(nodeid) is None:
                raise FuseError(errno.ENOENT)
            return self._dir_attr(nodeid), METADATA_TIMEOUT
        return self._file_attr(nodeid, self._object(nodeid)), METADATA_TIMEOUT

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        if nodeid >= FILE_BASE:
            raise FuseError(errno.ENOTDIR)
        if self.index.dir_path(nodeid) is None:
            raise FuseError(errno.ENOENT)
        return Opened(fh=next(self._serial) << _SERIAL_SHIFT)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterable[DirItem]:
        items = self._dir_handles.get((nodeid, fh))
        if items is None or offset == 0:
            # Built once per open directory (a handle from a previous process is rebuilt the
            # same: the order is the index's), so a large directory is not re-queried per call.
            # A listing that began in a previous process (an unknown handle past offset 0)
            # continues in the index it began in, the one this process replaced (a restart onto
            # a new snapshot, index_open.py): one listing never mixes two snapshots.
            index = self.index
            if items is None and offset > 0 and self._previous is not None:
                index = self._previous
            items = [(b".", nodeid, stat.S_IFDIR), (b"..", 1, stat.S_IFDIR)]
            for name, is_dir, ident, _obj in index.entries(nodeid):
                if is_dir:
                    items.append((name.encode("utf-8", "surrogateescape"), ident, stat.S_IFDIR))
                else:
                    items.append((name.encode("utf-8", "surrogateescape"), FILE_BASE + ident, stat.S_IFREG))
            self._dir_handles[(nodeid, fh)] = items
        for position in range(offset, len(items)):
            name, child, mode = items[position]
            yield DirItem(name=name, nodeid=child, mode=mode, next_offset=position + 1)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        # The session's signature (fusell.filesystem): with an extra ``flags`` parameter every
        # RELEASEDIR failed (a TypeError answered EIO, which the kernel ignores) and each
        # directory's entries stayed here: a walk of 1M files grew the worker by 190 MB
        # (196-220 B per indexed file, bench/ANALYSIS.md).
        self._dir_handles.pop((nodeid, fh), None)

    def statfs(self, ctx: Context, nodeid: int) -> StatFs:
        block = 4096
        return StatFs(blocks=-(-self.index.total_bytes // block), bfree=0, bavail=0,
                      files=self.index.files, ffree=0, bsize=block, namelen=255, frsize=block)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        if nodeid >= FILE_BASE:
            self._object(nodeid)
        elif self.index.dir_path(nodeid) is None:
            raise FuseError(errno.ENOENT)
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)
