"""A tiny read-only FUSE filesystem for tests: serves the files of one directory.

Tests use it as a stand-in FUSE view where the behaviour under test is the kernel's (a dead
connection gives ENOTCONN, a fresh mount gets a fresh device number), not the cache worker's.
Run as ``python tinyfuse.py SOURCE_DIR MOUNTPOINT``; stays in the foreground until killed.
"""

from __future__ import annotations

import errno
import os
import sys

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402


class Passthrough(mfusepy.Operations):
    use_ns = True
    def __init__(self, root: str) -> None:
        self.root = root

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._full(path))
        except FileNotFoundError:
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        keys = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_mtime", "st_atime", "st_ctime")
        attrs = {k: getattr(st, k) for k in keys}
        attrs["st_mode"] &= ~0o222  # read-only view
        return attrs

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise mfusepy.FuseOSError(errno.EROFS)
        return os.open(self._full(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")}


if __name__ == "__main__":
    source, mountpoint = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    mfusepy.FUSE(Passthrough(source), mountpoint, foreground=True, ro=True, allow_other=True)
