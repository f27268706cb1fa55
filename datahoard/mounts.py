"""The node's mount table and the two mount operations the worker and the CSI plugin share.

One parser for ``/proc/<pid>/mountinfo`` and one bind and one detach, used by the cache worker
(the direct tree's bind over its mountpoint), the CSI node plugin (binds into pods, repairs),
the FUSE keeper and the CLI's ``umount``. Each once had its own copy, and one of them knew only
four of mountinfo's escapes.

Why mountinfo and not ``os.path.ismount``: a FUSE mount whose daemon died fails ``stat`` with
ENOTCONN, and ``ismount`` then answers False, so a dead mount would look like a plain directory
and never get unmounted or repaired. mountinfo lists it regardless.

The syscalls go through libc, not ``mount(8)``: no dependency on util-linux in the image, exact
flags, and the errno of a failure instead of parsed stderr. Binding and detaching need
CAP_SYS_ADMIN in the mount namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2

#: Per-mount options a PV's ``mountOptions`` may add to the read-only bind. Anything else is
#: refused: the bind shares the worker's FUSE superblock, so filesystem options cannot apply.
MOUNT_FLAG_BITS: dict[str, int] = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}

#: Every bind is read-only, and never re-enables set-uid binaries or device nodes: a remount of
#: a bind replaces all per-mount flags, so leaving these out would *clear* the FUSE view's own
#: nosuid/nodev.
BASE_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV

#: Upper bound on stacked mounts removed from one target; guards against a loop on a path that
#: keeps reappearing in mountinfo (it cannot legitimately hold more than one per worker restart).
MAX_LAYERS = 256

SELF_MOUNTINFO = "/proc/self/mountinfo"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class MountEntry:
    """One line of a mountinfo table."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str
    mountpoint: str
    options: str
    optional: tuple[str, ...]  # propagation tags such as "shared:3", "master:2"
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options.split(",")

    @property
    def anonymous_minor(self) -> int | None:
        """The minor of a ``0:<minor>`` device (FUSE and other anonymous superblocks), else None."""
        major, _, minor = self.device.partition(":")
        return int(minor) if major == "0" and minor.isdigit() else None


def canonical(path: str | os.PathLike) -> str:
    """Absolute path with the parent resolved, without touching the last component.

    The last component may be a dead FUSE mount, where any stat (and so ``realpath``) fails.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    return os.path.join(os.path.realpath(parent), base) if base else path


def _unescape(field: str) -> str:
    r"""The kernel escapes space, tab, newline and backslash (and any byte it chooses) as \ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo table (proc(5)), in its order: later mounts stack on earlier."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if not sep or len(fields) < 6:
            continue
        fstype, source, *_ = right.split(" ") + [""]
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=fields[5],
                optional=tuple(fields[6:]),
                fstype=fstype,
                source=_unescape(source),
            )
        )
    return entries


def read_mountinfo(table: str = SELF_MOUNTINFO) -> list[MountEntry]:
    """The mounts of one table (``/proc/<pid>/mountinfo``); OSError if it cannot be read."""
    with open(table) as f:
        return parse_mountinfo(f.read())


def mounts_at(path: str | os.PathLike, table: str = SELF_MOUNTINFO) -> list[MountEntry]:
    """Mounts stacked on *path*, in mountinfo order (empty: not a mount point)."""
    where = canonical(path)
    return [m for m in read_mountinfo(table) if m.mountpoint == where]


def top_mounts(entries: list[MountEntry]) -> list[MountEntry]:
    """Mounts nothing else is stacked on: what a path lookup at their mount point reaches."""
    covered = {(e.parent_id, e.mountpoint) for e in entries}
    return [e for e in entries if (e.mount_id, e.mountpoint) not in covered]


def flags_for(mount_flags: list[str]) -> int:
    """The mount(2) flag bits for a PV's mountOptions (already validated against the table)."""
    bits = BASE_FLAGS
    for flag in mount_flags:
        bits |= MOUNT_FLAG_BITS[flag]
    return bits


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def bind_readonly(source: str | os.PathLike, target: str | os.PathLike, mount_flags: list[str]) -> None:
    """Bind *source* on *target* (on top of whatever is there) and make the bind read-only.

    Two steps, because the kernel ignores MS_RDONLY on the initial MS_BIND:
    1. ``mount(source, target, MS_BIND)`` stacks a bind of the source on the target.
    2. ``mount(NULL, target, MS_REMOUNT|MS_BIND|MS_RDONLY|...)`` makes that bind read-only.
    If step 2 fails, step 1 is undone, so a writable bind never stays behind; the flags are
    looked up before step 1, so an unknown one (KeyError) binds nothing at all.
    """
    flags = flags_for(mount_flags)
    src, tgt = os.fsencode(source), canonical(target).encode()
    _check(_libc.mount(src, tgt, None, MS_BIND, None), f"bind {os.fspath(source)}", os.fspath(target))
    rc = _libc.mount(None, tgt, None, MS_REMOUNT | MS_BIND | flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        _libc.umount2(tgt, MNT_DETACH)
        raise OSError(err, f"remount read-only: {os.strerror(err)}", os.fspath(target))


def detach(path: str | os.PathLike) -> None:
    """Lazily unmount (MNT_DETACH) the top mount at *path*; OSError with its errno if that fails."""
    _check(_libc.umount2(canonical(path).encode(), MNT_DETACH), "unmount", os.fspath(path))


def unmount_all(target: str | os.PathLike, table: str = SELF_MOUNTINFO) -> int:
    """Detach layer by layer until nothing is mounted on *target*; returns how many were removed.

    Lazy, because a normal unmount of a dead FUSE mount or of a busy one fails, and kubelet
    only calls NodeUnpublish once the pod's containers are gone: whatever still holds the
    mount is a leftover that must not block the cleanup.
    """
    removed = 0
    path = canonical(target)
    while mounts_at(path, table):
        if removed >= MAX_LAYERS:
            raise OSError(errno.EBUSY, f"still mounted after {removed} unmounts", os.fspath(target))
        rc = _libc.umount2(path.encode(), MNT_DETACH)
        if rc != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: raced, not a mount now
            _check(rc, "unmount", os.fspath(target))
        removed += 1
    return removed
