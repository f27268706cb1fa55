"""The kernel's mount table in memory: a :class:`~csi_node.mounter.Mounter` for unit tests of the
CSI node service, keeping the semantics :class:`LinuxMounter` gets from ``mount(2)``,
``umount2(2)`` and ``/proc/self/mountinfo`` (checked by ``test_mounter_contract.py``):

* ``bind_readonly`` stacks a new read-only (``ro,nosuid,nodev`` plus the PV's flags) layer on
  the target, on top of whatever is there: binding twice makes two layers, it is *not*
  idempotent (the node service is). Both paths must exist (ENOENT), a directory binds only
  onto a directory (ENOTDIR), an unknown flag is refused before anything is mounted. The new
  layer shows the source's filesystem: its device, fstype and root (a plain host directory
  keeps the root, fstype and device the machine's real mount table gives it).
* ``unmount_all`` detaches every layer (lazily: busy or dead mounts go too, and whatever is
  mounted below the target with them) and returns how many; a path with nothing mounted is 0,
  not an error.
* ``mounts_at`` canonicalises the path as LinuxMounter does (parent resolved, last component
  untouched) and lists the layers bottom first, each parented on the one below.
* ``probe`` answers for the top layer's filesystem: OK with its device, DISCONNECTED once the
  filesystem's daemon is gone (:meth:`FakeFilesystem.die`, ENOTCONN as the kernel gives for an
  aborted FUSE connection), HUNG when it stopped answering (:meth:`FakeFilesystem.hang`: no
  wait, the bounded probe's result). A path with no fake mount is probed on the real disk.

A test makes the filesystems a worker would mount with :meth:`FakeMounter.mount_filesystem`.
Paths are real directories (the node service creates and removes target directories itself);
only the mounts are pretend.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from dataclasses import dataclass, field, replace

from datahoard.csi_node.mounter import Health, Probe

from datahoard.mounts import MOUNT_FLAG_BITS, MountEntry, canonical, flags_for, parse_mountinfo

_DEVICES = itertools.count(4000)


@dataclass
class FakeFilesystem:
    """One superblock (a worker's FUSE view, a tmpfs): every bind of it shares its health."""

    fstype: str
    source: str
    minor: int = field(default_factory=lambda: next(_DEVICES))
    health: Health = Health.OK
    #: (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
    statvfs: tuple[int, ...] = (4096, 4096, 1000, 0, 0, 10, 0, 0, os.ST_RDONLY, 255)

    @property
    def device(self) -> int:
        return os.makedev(0, self.minor)

    def die(self) -> None:
        """The daemon behind it is gone: ENOTCONN on every access, as an aborted FUSE mount."""
        self.health = Health.DISCONNECTED

    def hang(self) -> None:
        """The daemon stopped answering: a probe gets no answer in time."""
        self.health = Health.HUNG

    def revive(self) -> None:
        self.health = Health.OK


@dataclass(frozen=True)
class _Layer:
    entry: MountEntry
    fs: FakeFilesystem | None  # None: a bind of a plain host directory ...
    host_path: str = ""  # ... this one, which the target then shows


class FakeMounter:
    """A :class:`Mounter` over an in-memory mount table; thread-safe."""

    def __init__(self) -> None:
        self._layers: list[_Layer] = []
        self._ids = itertools.count(10_000)
        self._lock = threading.Lock()
        self.binds = 0  # successful bind_readonly calls, for tests that count repairs

    # -- what a worker does ----------------------------------------------------------------------
    def mount_filesystem(self, path: str, fstype: str = "fuse.datahoard",
                         source: str = "datahoard") -> FakeFilesystem:
        """Mount a new filesystem at ``path`` (which must exist), as the cache worker does."""
        target = canonical(path)
        if not os.path.isdir(target):
            raise OSError(errno.ENOENT, "mount: no such directory", path)
        fs = FakeFilesystem(fstype, source)
        with self._lock:
            self._push(target, fs, root="/", options="rw,nosuid,nodev,relatime",
                       device=f"0:{fs.minor}", fstype=fstype, source=source)
        return fs

    # -- the Mounter protocol --------------------------------------------------------------------
    def mounts_at(self, path: str) -> list[MountEntry]:
        path = canonical(path)
        with self._lock:
            return [layer.entry for layer in self._layers if layer.entry.mountpoint == path]

    def bind_readonly(self, source: str, target: str, mount_flags: list[str]) -> None:
        flags_for(mount_flags)  # KeyError on an unknown flag, as LinuxMounter
        src, tgt = canonical(source), canonical(target)
        with self._lock:
            below = self._covering(src)
            if below is None and not os.path.lexists(src):
                raise OSError(errno.ENOENT, f"bind {source}: {os.strerror(errno.ENOENT)}", target)
            if not os.path.lexists(tgt) and not any(l.entry.mountpoint == tgt for l in self._layers):
                raise OSError(errno.ENOENT, f"bind {source}: {os.strerror(errno.ENOENT)}", target)
            src_dir = below is not None and below.entry.mountpoint == src or os.path.isdir(src)
            tgt_dir = any(l.entry.mountpoint == tgt for l in self._layers) or os.path.isdir(tgt)
            if src_dir != tgt_dir:
                raise OSError(errno.ENOTDIR, f"bind {source}: {os.strerror(errno.ENOTDIR)}", target)
            options = ["ro", "nosuid", "nodev"] + sorted(
                {f for f in mount_flags if f not in ("ro", "nosuid", "nodev")}, key=list(MOUNT_FLAG_BITS).index)
            if "noatime" not in options and "relatime" not in options:
                options.append("relatime")
            if below is not None:
                rel = os.path.relpath(src, below.entry.mountpoint)
                root = os.path.normpath(os.path.join(below.entry.root, rel))
                host_path = os.path.normpath(os.path.join(below.host_path, rel)) if below.host_path else ""
                self._push(tgt, below.fs, host_path=host_path, root=root, options=",".join(options),
                           device=below.entry.device, fstype=below.entry.fstype,
                           source=below.entry.source)
            else:
                host = _host_mount_of(src)
                rel = os.path.relpath(src, host.mountpoint)
                root = os.path.normpath(os.path.join(host.root, rel))
                st = os.stat(src)
                self._push(tgt, None, host_path=src, root=root, options=",".join(options),
                           device=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                           fstype=host.fstype, source=host.source)
            self.binds += 1

    def unmount_all(self, target: str) -> int:
        path = canonical(target)
        with self._lock:
            removed = sum(1 for l in self._layers if l.entry.mountpoint == path)
            if removed:  # MNT_DETACH takes whatever is mounted below the target along
                self._layers = [l for l in self._layers if l.entry.mountpoint != path
                                and not l.entry.mountpoint.startswith(path.rstrip("/") + "/")]
            return removed

    def probe(self, path: str, timeout: float) -> Probe:
        path = os.path.abspath(path)
        with self._lock:
            top = self._covering(path)
        if top is None:
            try:
                vfs = os.statvfs(path)
                return Probe(Health.OK, device=os.stat(path).st_dev, statvfs=vfs)
            except FileNotFoundError:
                return Probe(Health.MISSING, detail="no such file or directory")
            except OSError as exc:
                return Probe(Health.ERROR, detail=exc.strerror or str(exc))
        fs = top.fs
        if fs is None:  # a bind of a plain host directory: that directory answers
            shown = os.path.join(top.host_path, os.path.relpath(path, top.entry.mountpoint))
            try:
                return Probe(Health.OK, device=os.stat(shown).st_dev, statvfs=os.statvfs(shown))
            except FileNotFoundError:
                return Probe(Health.MISSING, detail="no such file or directory")
        if fs.health is Health.DISCONNECTED:
            return Probe(Health.DISCONNECTED, detail=os.strerror(errno.ENOTCONN))
        if fs.health is Health.HUNG:
            return Probe(Health.HUNG, detail=f"no answer within {timeout:g}s")
        return Probe(Health.OK, device=fs.device, statvfs=os.statvfs_result(fs.statvfs))

    # -- inside ----------------------------------------------------------------------------------
    def _push(self, mountpoint: str, fs: FakeFilesystem | None, host_path: str = "",
              **fields: str) -> None:
        under = [l for l in self._layers if l.entry.mountpoint == mountpoint]
        parent = under[-1].entry.mount_id if under else 1
        entry = MountEntry(mount_id=next(self._ids), parent_id=parent, mountpoint=mountpoint,
                           optional=(), **fields)
        self._layers.append(_Layer(entry, fs, host_path))

    def _covering(self, path: str) -> _Layer | None:
        """The top layer of the deepest fake mount point at or above ``path``."""
        best: _Layer | None = None
        for layer in self._layers:
            mp = layer.entry.mountpoint
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) >= len(best.entry.mountpoint):
                    best = layer
        return best


def _host_mount_of(path: str) -> MountEntry:
    """The machine's real mount holding ``path`` (read-only look at /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        entries = parse_mountinfo(f.read())
    best = None
    for entry in entries:
        mp = entry.mountpoint
        if path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mountpoint):
                best = entry
    assert best is not None, "no root mount in /proc/self/mountinfo"
    return replace(best)
