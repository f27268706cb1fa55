"""Placing a read-only clone of a live view on top of a dead mount, in any mount namespace.

Uses the new mount API (Linux 5.12+): ``open_tree(OPEN_TREE_CLONE)`` makes a detached copy of
the view, ``mount_setattr`` makes it read-only (atomically, before anyone can see it) and a
slave (it receives the host's mount events but never sends any back), and ``move_mount``
attaches it. A detached tree can be attached in *another* mount namespace, which is how a
container whose volume has no mount propagation gets its repair.

Joining another mount namespace (``setns``) is refused to a multithreaded process, and the
plugin has gRPC threads; so that step runs in a short-lived helper process,
``python -m datahoard.csi_node.nsmount TREE_FD NS_PATH MOUNTPOINT``, which inherits the
detached tree's descriptor, joins the namespace, checks that the mount there is really dead,
and attaches the tree. Everything it needs is imported before it joins the namespace: after
that, paths resolve in the container's filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

_SYS = {"open_tree": 428, "move_mount": 429, "mount_setattr": 442}  # same on x86_64 and arm64
OPEN_TREE_CLONE = 0x1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MS_SLAVE = 1 << 19
CLONE_NEWNS = 0x00020000

#: Exit codes of the helper, so the parent can tell "nothing to do" from a failure.
EXIT_DONE, EXIT_NOT_DEAD, EXIT_FAILED = 0, 3, 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc: int, what: str, path: str = "") -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)
    return rc


def clone_readonly(path: str, noexec: bool = False) -> int:
    """A detached, read-only, nosuid, nodev, slave clone of the mount at *path*; returns its fd."""
    fd = _check(_libc.syscall(_SYS["open_tree"], AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC),
                "open_tree", path)
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_NOEXEC if noexec else 0),
                      0, MS_SLAVE, 0)
    try:
        _check(_libc.syscall(_SYS["mount_setattr"], fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
               "mount_setattr", path)
    except OSError:
        os.close(fd)
        raise
    return fd


def attach(fd: int, mountpoint: str) -> None:
    """Attach the detached tree *fd* on top of *mountpoint* (in the current mount namespace)."""
    _check(_libc.syscall(_SYS["move_mount"], fd, b"", AT_FDCWD, mountpoint.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           "move_mount", mountpoint)


def _is_dead(path: str) -> bool:
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def helper_main(argv: list[str]) -> int:
    """TREE_FD NS_PATH MOUNTPOINT: join the namespace, attach the tree if the mount is dead."""
    fd, ns_path, mountpoint = int(argv[0]), argv[1], argv[2]
    ns_fd = os.open(ns_path, os.O_RDONLY)
    _check(_libc.setns(ns_fd, CLONE_NEWNS), "setns", ns_path)
    os.chdir("/")
    # Never bind over a live mount: a device number can be reused once a dead superblock is gone.
    if not _is_dead(mountpoint):
        return EXIT_NOT_DEAD
    attach(fd, mountpoint)
    return EXIT_DONE


if __name__ == "__main__":
    try:
        sys.exit(helper_main(sys.argv[1:]))
    except OSError as exc:
        print(f"nsmount: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
