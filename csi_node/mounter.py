"""Mount operations the node plugin needs, behind a small interface.

The node service only binds, unbinds, lists and probes; it talks to :class:`Mounter` so the
policy (what to mount where, when to repair) is separate from the syscalls. :class:`LinuxMounter`
is the real one: the mount table and the bind/detach syscalls are ``datahoard.mounts``, which
the cache worker uses too; what is the plugin's own here is the bounded probe.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from datahoard import mounts
from datahoard.mounts import MountEntry


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
    """:class:`Mounter` on Linux syscalls (``datahoard.mounts``); needs CAP_SYS_ADMIN in the
    mount namespace."""

    def __init__(self, mountinfo: str = mounts.SELF_MOUNTINFO) -> None:
        self.mountinfo = mountinfo

    def mounts(self) -> list[MountEntry]:
        return mounts.read_mountinfo(self.mountinfo)

    def mounts_at(self, path: str) -> list[MountEntry]:
        return mounts.mounts_at(path, self.mountinfo)

    def bind_readonly(self, source: str, target: str, mount_flags: list[str]) -> None:
        mounts.bind_readonly(source, target, mount_flags)

    def unmount_all(self, target: str) -> int:
        return mounts.unmount_all(target, self.mountinfo)

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
