"""Mount operations the node plugin needs, behind a small interface.

The node service only binds, unbinds, lists and probes; it talks to :class:`Mounter` so the
policy (what to mount where, when to repair) is separate from the syscalls. :class:`LinuxMounter`
calls ``mount(2)``/``umount2(2)`` through libc instead of running ``mount(8)``: no dependency on
util-linux in the image, exact flags, and the errno of a failure instead of parsed stderr.

Why /proc/self/mountinfo and not ``os.path.ismount``: a FUSE mount whose daemon died fails
``stat`` with ENOTCONN, and ``ismount`` then answers False, so a dead mount would look like a
plain directory and never get unmounted or repaired. mountinfo lists it regardless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

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

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

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


class Health(enum.Enum):
    """What a probe of a path found."""

    OK = "ok"
    DISCONNECTED = "disconnected"  # ENOTCONN/ECONNABORTED: the FUSE daemon behind it is gone
    MISSING = "missing"
    HUNG = "hung"  # the filesystem did not answer within the probe timeout
    ERROR = "error"


@dataclass(frozen=True)
class Probe:
    health: Health
    device: int | None = None  # st_dev when OK: identifies the superblock (a new FUSE mount gets a new one)
    detail: str = ""
    statvfs: os.statvfs_result | None = None


def canonical(path: str) -> str:
    """Absolute path with the parent resolved, without touching the last component.

    The last component may be a dead FUSE mount, where any stat (and so ``realpath``) fails.
    """
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    return os.path.join(os.path.realpath(parent), base) if base else path


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \040 \011 \012 \134."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split(" ")
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


class Mounter(Protocol):
    """The mount operations the node service and the repairer use."""

    def mounts_at(self, path: str) -> list[MountEntry]:
        """Mounts stacked on *path*, in mountinfo order (empty: not a mount point)."""
        ...

    def bind_readonly(self, source: str, target: str, mount_flags: list[str]) -> None:
        """Bind *source* on *target* (on top of whatever is there) and make it read-only."""
        ...

    def unmount_all(self, target: str) -> int:
        """Detach every mount stacked on *target*; returns how many were removed."""
        ...

    def probe(self, path: str, timeout: float) -> Probe:
        """Whether *path* answers, without hanging the caller on a stuck filesystem."""
        ...


class LinuxMounter:
    """:class:`Mounter` on Linux syscalls; needs CAP_SYS_ADMIN in the mount namespace."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.mountinfo = mountinfo

    def mounts(self) -> list[MountEntry]:
        with open(self.mountinfo) as f:
            return parse_mountinfo(f.read())

    def mounts_at(self, path: str) -> list[MountEntry]:
        path = canonical(path)
        return [m for m in self.mounts() if m.mountpoint == path]

    def bind_readonly(self, source: str, target: str, mount_flags: list[str]) -> None:
        """Two steps, because the kernel ignores MS_RDONLY on the initial MS_BIND.

        1. ``mount(source, target, MS_BIND)`` stacks a bind of the view's mount on the target.
        2. ``mount(NULL, target, MS_REMOUNT|MS_BIND|MS_RDONLY|...)`` makes that bind read-only.
        If step 2 fails, step 1 is undone, so a writable bind never stays behind.
        """
        src, tgt = source.encode(), canonical(target).encode()
        _check(_libc.mount(src, tgt, None, MS_BIND, None), f"bind {source}", target)
        rc = _libc.mount(None, tgt, None, MS_REMOUNT | MS_BIND | flags_for(mount_flags), None)
        if rc != 0:
            err = ctypes.get_errno()
            _libc.umount2(tgt, MNT_DETACH)
            raise OSError(err, f"remount read-only: {os.strerror(err)}", target)

    def unmount_all(self, target: str) -> int:
        """Lazy-unmount (MNT_DETACH) layer by layer until nothing is mounted on *target*.

        Lazy, because a normal unmount of a dead FUSE mount or of a busy one fails, and kubelet
        only calls NodeUnpublish once the pod's containers are gone: whatever still holds the
        mount is a leftover that must not block the cleanup.
        """
        removed = 0
        path = canonical(target)
        while self.mounts_at(path):
            if removed >= MAX_LAYERS:
                raise OSError(errno.EBUSY, f"still mounted after {removed} unmounts", target)
            rc = _libc.umount2(path.encode(), MNT_DETACH)
            if rc != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: raced, not a mount now
                _check(rc, "unmount", target)
            removed += 1
        return removed

    def probe(self, path: str, timeout: float) -> Probe:
        """statvfs + stat, bounded by *timeout*, so a stuck FUSE daemon cannot hang an RPC.

        statvfs always reaches the FUSE daemon (the kernel caches attributes, never statfs),
        which is what tells a live view from a dead one; stat then gives the device number.
        """

        def run() -> Probe:
            try:
                vfs = os.statvfs(path)
                return Probe(Health.OK, device=os.stat(path).st_dev, statvfs=vfs)
            except OSError as exc:
                if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    return Probe(Health.DISCONNECTED, detail=os.strerror(exc.errno))
                if exc.errno == errno.ENOENT:
                    return Probe(Health.MISSING, detail="no such file or directory")
                return Probe(Health.ERROR, detail=exc.strerror or str(exc))

        result = bounded(run, timeout, f"probe {path}")
        return result if result is not None else Probe(Health.HUNG, detail=f"no answer within {timeout:g}s")


T = TypeVar("T")


def bounded(fn: Callable[[], T], timeout: float, name: str) -> T | None:
    """Run *fn* in a daemon thread; its result, or None if it did not finish within *timeout*.

    For anything that touches a FUSE mount: nothing can cancel a syscall blocked on a stuck
    daemon, so the thread is abandoned and finishes (or not) on its own. Exceptions propagate.
    """
    box: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        return None
    ok, value = box[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
