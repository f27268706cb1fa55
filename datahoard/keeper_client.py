"""A worker's side of the FUSE keeper (:mod:`fuse_keeper`): deposit a ``/dev/fuse`` descriptor
after mounting, claim it back after a restart, release it on a clean unmount; and the one line
``datahoard status`` prints about a mount's keeper. What one exchange costs is measured in
:mod:`fuse_keeper`'s docstring.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .fuse_fds import TruncatedMessage, recv_message, send_message
from .keeper_protocol import (
    CLIENT_TIMEOUT,
    MAX_MESSAGE,
    Claimed,
    EntryInfo,
    KeeperError,
    KeeperRefused,
    KeeperUnavailable,
    Reply,
    Request,
)


class KeeperClient:
    """A worker's connection to the keeper. Keep it open while serving: it is the lease.

    Mountpoints are canonicalised without a stat (``runtime.canonical_mountpoint``) to the
    form mountinfo shows. Every exchange waits at most ``timeout`` seconds.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = CLIENT_TIMEOUT) -> None:
        from .runtime import keeper_socket

        self.path = Path(path) if path is not None else keeper_socket()
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise KeeperUnavailable(f"no FUSE keeper runs at {self.path} ({exc.strerror}): a worker restart "
                                    f"will remount, and readers see errors meanwhile") from None
        except PermissionError:
            sock.close()
            raise KeeperUnavailable(f"may not use the FUSE keeper at {self.path} (permission denied: only "
                                    f"root and the keeper's own user may)") from None
        except OSError as exc:
            sock.close()
            raise KeeperUnavailable(f"cannot reach the FUSE keeper at {self.path}: {exc}") from None
        self._sock: socket.socket | None = sock

    def _exchange(self, request: Request, fd: int | None = None) -> tuple[Reply, int | None]:
        if self._sock is None:
            raise KeeperError("the keeper connection is closed")
        data = request.model_dump_json(exclude_none=True).encode()
        if len(data) > MAX_MESSAGE:
            raise KeeperError(f"{request.op}: the message is {len(data)} bytes, more than {MAX_MESSAGE}")
        try:
            try:
                send_message(self._sock, data, fd)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the keeper said why before closing (a refused uid, too many clients): read it
            answer, fds = recv_message(self._sock, MAX_MESSAGE)
        except TruncatedMessage as exc:
            raise KeeperError(str(exc)) from None
        except TimeoutError:
            raise KeeperError(f"the FUSE keeper at {self.path} did not answer {request.op} within "
                              f"{self.timeout:g} s") from None
        except OSError as exc:
            raise KeeperError(f"{request.op} to the FUSE keeper at {self.path} failed: {exc}") from None
        if not answer:
            raise KeeperError(f"the FUSE keeper at {self.path} closed the connection")
        try:
            reply = Reply.model_validate_json(answer)
        except ValidationError:
            for got in fds:
                os.close(got)
            raise KeeperError(f"unreadable answer from the FUSE keeper at {self.path}") from None
        if reply.status == "error":
            for got in fds:
                os.close(got)
            raise KeeperError(reply.message)
        if reply.status == "refused":
            for got in fds:
                os.close(got)
            raise KeeperRefused(reply.message, reply.pid)
        return reply, (fds[0] if fds else None)

    @staticmethod
    def _canonical(mountpoint: str | os.PathLike) -> str:
        from .runtime import canonical_mountpoint

        return canonical_mountpoint(mountpoint)

    def deposit(self, mountpoint: str | os.PathLike, state: dict[str, Any], fd: int) -> None:
        """Hand the keeper a duplicate of ``fd`` (ours stays ours) and take the lease."""
        self._exchange(Request(op="deposit", mountpoint=self._canonical(mountpoint), state=state), fd)

    def claim(self, mountpoint: str | os.PathLike) -> Claimed | None:
        """The held connection of ``mountpoint`` and the lease on it, or None when none is held.
        Raises :class:`KeeperRefused` while another live worker serves it."""
        reply, fd = self._exchange(Request(op="claim", mountpoint=self._canonical(mountpoint)))
        if reply.status == "none":
            return None
        if fd is None:
            raise KeeperError("the FUSE keeper answered a claim without a descriptor")
        return Claimed(fd, reply.state or {})

    def release(self, mountpoint: str | os.PathLike) -> bool:
        """The keeper lets go of ``mountpoint``'s connection (a clean unmount); False if it held none."""
        reply, _ = self._exchange(Request(op="release", mountpoint=self._canonical(mountpoint)))
        return reply.status == "ok"

    def entries(self) -> list[EntryInfo]:
        reply, _ = self._exchange(Request(op="list"))
        return reply.entries or []

    def connected(self) -> bool:
        """Whether the keeper is still at the other end (it closes its side when it stops: a
        CSI plugin restart). Never blocks: one poll of the socket."""
        if self._sock is None:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)  # the keeper never speaks first: any event means it is gone

    def close(self) -> None:
        """Ends the lease: what this client deposited or claimed stays held, claimable."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> KeeperClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(path: str | os.PathLike, mountpoint: str | os.PathLike, timeout: float = 1.0) -> str:
    """One line for ``datahoard status``: does a keeper hold this mount's connection?"""
    try:
        with KeeperClient(path, timeout=timeout) as client:
            entries = client.entries()
    except KeeperError as exc:
        return f"none ({exc})" if not isinstance(exc, KeeperUnavailable) else "none: worker restarts remount"
    from .runtime import canonical_mountpoint

    wanted = canonical_mountpoint(mountpoint)
    for entry in entries:
        if entry.mountpoint == wanted:
            who = f"served by pid {entry.served_by}" if entry.served_by else "no worker serving it now"
            return f"holds the FUSE connection ({entry.connection}), {who}: a worker restart is not seen by readers"
    return (f"running at {path}, but holds no connection of this mount: the worker does not hand it over "
            f"yet, so a worker restart remounts")

