"""``/dev/fuse`` descriptors: telling one from another file, which FUSE connection and mount it
is, and passing it between processes over a unix socket (``SCM_RIGHTS``, with the peer's
credentials from ``SO_PEERCRED``). The FUSE keeper (:mod:`fuse_keeper`) and its clients
(:mod:`keeper_client`) use these; nothing here knows the keeper's protocol.

The keeper never ``stat``s a mountpoint: on a held connection whose worker is down, a stat waits
for the next worker. It identifies a connection by ``fuse_connection`` in the descriptor's
``/proc/self/fdinfo`` (the minor device number of the mount, Linux 6.x) and the mount by the
``0:<minor>`` device in mountinfo.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

from .mounts import read_mountinfo

#: /dev/fuse is the misc character device 10:229.
_FUSE_RDEV = os.makedev(10, 229)
_UCRED = struct.Struct("3i")


class TruncatedMessage(Exception):
    """A message longer than the reader's limit, or with more than one descriptor."""


def is_fuse_device(fd: int) -> bool:
    """Whether ``fd`` is a descriptor of /dev/fuse."""
    st = os.fstat(fd)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == _FUSE_RDEV


def fuse_connection(fd: int) -> int | None:
    """The FUSE connection id of a /dev/fuse descriptor (``fuse_connection`` in fdinfo, equal
    to the minor device number of its mount), or None on a kernel that does not show it."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "fuse_connection":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def fuse_mounts() -> set[tuple[str, int]]:
    """(mountpoint, minor device) of every FUSE mount this process can see."""
    return {(m.mountpoint, m.anonymous_minor) for m in read_mountinfo()
            if m.fstype.startswith("fuse") and m.anonymous_minor is not None}


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def recv_message(sock: socket.socket, max_size: int) -> tuple[bytes, list[int]]:
    """One message and its descriptors; b"" at end of stream. A truncated message is an error
    (and its descriptors are closed, never leaked)."""
    data, fds, flags, _ = socket.recv_fds(sock, max_size, 1)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise TruncatedMessage(f"message longer than {max_size} bytes or with more than one descriptor")
    return data, fds


def send_message(sock: socket.socket, data: bytes, fd: int | None = None, flags: int = 0) -> None:
    """``data`` as one message, with a duplicate of ``fd`` (ours stays ours) when given."""
    socket.send_fds(sock, [data], [fd] if fd is not None else [], flags)

