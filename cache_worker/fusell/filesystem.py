"""The handler interface a view implements: one method per FUSE request it answers.

Kept apart from the session so a view imports what it implements without the loop.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from .model import Attr, ConnInfo, Context, DirItem, Entry, FuseError, Opened, StatFs


class Filesystem:
    """Subclass and override. Every method not overridden answers ENOSYS (or is a no-op where
    the kernel expects no answer); the session answers EROFS to every write-type opcode itself.
    Raise :class:`FuseError` to answer an errno; any other exception becomes EIO."""

    #: A LOOKUP answer stays true until the filesystem says otherwise (the session's native
    #: part may then answer the same LOOKUP again without asking: fastopen.py), and FORGET
    #: frees nothing.
    names_immutable = False

    def init(self, info: ConnInfo) -> None:
        pass

    def destroy(self) -> None:
        pass

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise FuseError(errno.ENOSYS)

    def forget(self, nodeid: int, nlookup: int) -> None:
        pass

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        raise FuseError(errno.ENOSYS)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        raise FuseError(errno.ENOSYS)

    def open(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        raise FuseError(errno.ENOSYS)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int
    ) -> bytes | memoryview:
        raise FuseError(errno.ENOSYS)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        pass

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        raise FuseError(errno.ENOSYS)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterable[DirItem]:
        raise FuseError(errno.ENOSYS)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        pass

    def statfs(self, ctx: Context, nodeid: int) -> StatFs:
        return StatFs()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise FuseError(errno.ENOSYS)
