"""One ``/dev/fuse`` connection: mounting it, resuming it in another process, and the ioctls
and notifications that act on the connection rather than answer a request.

The connection lives as long as any descriptor of its open file does (facts/fuse-restart.md),
so a holder that keeps a duplicate lets a restarted worker :meth:`Connection.resume` it: no
second INIT comes, the :class:`InitState` the first process wrote says what was agreed.
Requests the dead process had read stay in the kernel's processing queue until
:meth:`Connection.notify_resend` puts them back on the pending queue (Linux 6.9+).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
from collections.abc import Iterable

from . import abi
from .state import InitState

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
FUSERMOUNT_TIMEOUT = 30.0


class MountError(RuntimeError):
    pass


class Connection:
    """A FUSE connection's descriptor plus what INIT agreed on it (``state``; None until INIT
    on a fresh mount)."""

    def __init__(self, fd: int, state: InitState | None, mountpoint: str | None = None):
        self.fd = fd
        self.state = state
        self.mountpoint = mountpoint

    # -- getting one ----------------------------------------------------------------------
    @classmethod
    def mount(
        cls,
        mountpoint: str | os.PathLike,
        *,
        fsname: str,
        subtype: str = "datahoard",
        allow_other: bool = True,
        read_only: bool = True,
        extra_options: Iterable[str] = (),
    ) -> "Connection":
        """Mount a new FUSE filesystem at ``mountpoint`` and return its connection (INIT is
        still to come: serve it with a :class:`Session`). Root mounts with mount(2); anyone
        else goes through ``fusermount3``, which passes the descriptor back over a socket."""
        mnt = os.fspath(mountpoint)
        if not os.path.isdir(mnt):
            raise MountError(f"mount point {mnt!r} is not a directory")
        extra = [o for o in extra_options if o]
        if os.geteuid() == 0:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            opts = [
                f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", "default_permissions",
            ]
            if allow_other:
                opts.append("allow_other")
            flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
            data = ",".join(opts + extra).encode()
            fstype = f"fuse.{subtype}".encode()
            if _libc.mount(fsname.encode(), mnt.encode(), fstype, flags, data) != 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise MountError(f"mount(2) of {mnt!r} failed: {os.strerror(err)}")
            return cls(fd, None, mnt)
        return cls(_fusermount(mnt, fsname, subtype, allow_other, read_only, extra), None, mnt)

    @classmethod
    def resume(cls, fd: int, state: InitState, mountpoint: str | None = None) -> "Connection":
        """Serve a connection another process mounted and INITed (no INIT will come)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise MountError(f"descriptor {fd} to resume is not open: {e}") from e
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):
            raise MountError(f"descriptor {fd} to resume is not /dev/fuse")
        return cls(fd, state, mountpoint)

    # -- acting on it ---------------------------------------------------------------------
    def backing_open(self, backing_fd: int) -> int:
        """Register an open file as a passthrough backing file; returns its backing id. The
        kernel keeps its own reference: ``backing_fd`` may be closed afterwards. Needs root
        (CAP_SYS_ADMIN) and passthrough agreed at INIT."""
        buf = bytearray(abi.BACKING_MAP.pack(backing_fd, 0, 0))
        try:
            return fcntl.ioctl(self.fd, abi.FUSE_DEV_IOC_BACKING_OPEN, buf, True)
        except OSError as e:
            hint = ""
            if e.errno == errno.EPERM:
                hint = " (passthrough not agreed at INIT, or not root)"
            raise OSError(e.errno, f"FUSE_DEV_IOC_BACKING_OPEN failed{hint}: {e.strerror}") from e

    def backing_close(self, backing_id: int) -> None:
        fcntl.ioctl(self.fd, abi.FUSE_DEV_IOC_BACKING_CLOSE,
                    bytearray(struct.pack("=I", backing_id)), True)

    def notify_resend(self) -> None:
        """Ask the kernel to queue again every request a previous server read but did not
        answer (FUSE_NOTIFY_RESEND, Linux 6.9+). They come back with bit 63 set in ``unique``."""
        if self.state is not None and not self.state.kernel_flags & abi.Init.HAS_RESEND:
            raise OSError(errno.ENOSYS, "this kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+): "
                          "requests the previous server read stay unanswered")
        os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, abi.Notify.RESEND, 0))

    def notify_inval_entry(self, parent: int, name: bytes) -> bool:
        """Make the kernel forget the dentry ``name`` in directory ``parent`` (FUSE_NOTIFY_INVAL_ENTRY),
        so the next lookup of it asks this server again. False: the kernel holds no such
        directory or name (nothing to forget). Must not be sent from a request handler of a
        lookup in ``parent`` (the kernel takes the directory's lock)."""
        body = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), abi.Notify.INVAL_ENTRY, 0)
        try:
            os.write(self.fd, header + body)
        except FileNotFoundError:
            return False
        return True

    def clone_fd(self) -> int:
        """A second open file on the same connection (FUSE_DEV_IOC_CLONE). Not used by the
        session: closing a clone fails the requests read through it (see session.py)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, abi.FUSE_DEV_IOC_CLONE, bytearray(struct.pack("=I", self.fd)), True)
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def unmount(mountpoint: str | os.PathLike, lazy: bool = False) -> None:
    mnt = os.fspath(mountpoint)
    if os.geteuid() == 0:
        if _libc.umount2(mnt.encode(), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise MountError(f"umount of {mnt!r} failed: {os.strerror(err)}")
        return
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + ["--", mnt]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=FUSERMOUNT_TIMEOUT)
    if res.returncode:
        raise MountError(f"fusermount3 -u {mnt!r} failed: {res.stderr.strip()}")


def _fusermount(mnt: str, fsname: str, subtype: str, allow_other: bool, read_only: bool,
                extra: list[str]) -> int:
    """Mount through the setuid helper; it sends the /dev/fuse descriptor over _FUSE_COMMFD."""
    opts = ["nosuid", "nodev", "default_permissions", f"fsname={fsname}", f"subtype={subtype}"]
    opts += ["ro"] if read_only else []
    opts += ["allow_other"] if allow_other else []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(
            ["fusermount3", "-o", ",".join(opts + extra), "--", mnt],
            env=env, pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True,
        )
        theirs.close()
        ours.settimeout(FUSERMOUNT_TIMEOUT)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except (TimeoutError, OSError) as e:
            proc.kill()
            raise MountError(f"fusermount3 sent no descriptor for {mnt!r}: {e}") from e
        _, err = proc.communicate(timeout=FUSERMOUNT_TIMEOUT)
        if not fds:
            raise MountError(f"fusermount3 could not mount {mnt!r}: {err.strip()}")
        os.set_inheritable(fds[0], False)
        return fds[0]
