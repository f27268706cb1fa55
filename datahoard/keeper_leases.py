"""The FUSE keeper's table of held connections (:mod:`fuse_keeper`): who may deposit, claim and
release which mountpoint's ``/dev/fuse`` descriptor, and when a held one is dropped.

The lease: a client connection that deposited or claimed an entry holds it for as long as that
connection stays open (a worker keeps its keeper connection open while it serves). A CLAIM or a
DEPOSIT of that mountpoint by anyone else is refused, naming the serving pid: two processes must
never read one FUSE connection (each would get half the requests). When the connection closes
(the worker exited or was SIGKILLed: the kernel closes its socket either way), the entry stays,
held and claimable by the next worker.

An entry is dropped, and its descriptor closed, when the FUSE connection has ended (``poll``
says POLLERR: the mount was unmounted or the connection aborted), when its mountpoint no longer
carries a FUSE mount of that connection (``/proc/self/mountinfo``: lazily detached), on RELEASE,
and when no worker has claimed it for ``orphan_timeout`` seconds: readers then fail (ENOTCONN,
as without a keeper) instead of waiting forever for a worker that is not coming.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fuse_fds import fuse_connection, fuse_mounts, is_fuse_device
from .keeper_protocol import EntryInfo, Reply

log = logging.getLogger("datahoard.fuse_keeper")  # one log for the keeper, as before the split


@dataclass(eq=False)
class Client:
    """One connection to the keeper; a lease is held by it, and ends when it closes."""

    sock: socket.socket
    pid: int
    uid: int


@dataclass(eq=False)
class _Entry:
    mountpoint: str
    fd: int
    state: dict[str, Any]
    connection: int | None
    deposited: float = field(default_factory=time.monotonic)
    lease: Client | None = None
    #: Monotonic time the last lease ended, while no worker holds one.
    unclaimed_since: float | None = None


class HeldConnections:
    """The entries one keeper holds, by mountpoint; every method is safe from any thread.

    ``on_change`` is called after a deposit (the keeper's watcher then checks at once).
    """

    def __init__(self, max_entries: int, orphan_timeout: float, on_change: Callable[[], None]) -> None:
        self.max_entries = max_entries
        self.orphan_timeout = orphan_timeout
        self._on_change = on_change
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def entries(self) -> list[EntryInfo]:
        now = time.monotonic()
        with self._lock:
            return [EntryInfo(mountpoint=e.mountpoint, connection=e.connection,
                              served_by=e.lease.pid if e.lease else None,
                              held_seconds=round(now - e.deposited, 3),
                              unclaimed_seconds=None if e.unclaimed_since is None
                              else round(now - e.unclaimed_since, 3))
                    for e in self._entries.values()]

    def let_go(self, client: Client) -> None:
        """The client's connection ended: its leases end, its entries stay claimable."""
        now = time.monotonic()
        with self._lock:
            for entry in self._entries.values():
                if entry.lease is client:
                    entry.lease = None
                    entry.unclaimed_since = now
                    log.info("FUSE keeper: pid %d let go of %s; the connection is held for the next worker",
                             client.pid, entry.mountpoint)

    def close(self) -> int:
        """Close every held descriptor (the keeper stops); how many there were."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            os.close(entry.fd)
        return len(entries)

    def deposit(self, client: Client, mountpoint: str, state: dict[str, Any], fds: list[int]) -> Reply:
        if len(fds) != 1:
            return Reply(status="error", message="deposit: send exactly one /dev/fuse descriptor with it")
        if not is_fuse_device(fds[0]):
            return Reply(status="error", message="deposit: the descriptor is not /dev/fuse")
        connection = fuse_connection(fds[0])
        if connection is not None and (mountpoint, connection) not in fuse_mounts():
            return Reply(status="error", message=(
                f"deposit: {mountpoint} carries no FUSE mount of this connection ({connection}); deposit "
                f"after mounting, with the mountpoint as /proc/self/mountinfo shows it"))
        with self._lock:
            old = self._entries.get(mountpoint)
            if old is not None and (holder := self._held_by_other(old, client)):
                return Reply(status="refused", pid=holder.pid, message=f"{mountpoint} is served by pid {holder.pid}")
            if old is None and len(self._entries) >= self.max_entries:
                return Reply(status="error", message=f"the FUSE keeper holds {self.max_entries} connections "
                                                      f"already (its cap)")
            self._entries[mountpoint] = _Entry(mountpoint, os.dup(fds[0]), state, connection, lease=client)
        if old is not None:
            os.close(old.fd)  # a fresh mount replaced the one held
        self._on_change()
        log.info("FUSE keeper: pid %d deposited %s (connection %s)", client.pid, mountpoint, connection)
        return Reply(status="ok")

    def claim(self, client: Client, mountpoint: str) -> tuple[Reply, int | None]:
        self.check(mountpoint)
        with self._lock:
            entry = self._entries.get(mountpoint)
            if entry is None:
                return Reply(status="none", message=f"no FUSE connection of {mountpoint} is held"), None
            if holder := self._held_by_other(entry, client):
                return Reply(status="refused", pid=holder.pid,
                              message=f"{mountpoint} is served by pid {holder.pid}"), None
            entry.lease, entry.unclaimed_since = client, None
            log.info("FUSE keeper: pid %d claimed %s (connection %s)", client.pid, mountpoint, entry.connection)
            # A duplicate taken under the lock: the watcher may drop (close) the entry's own
            # descriptor at any moment, and a closed number may be reused by then.
            return Reply(status="ok", state=entry.state), os.dup(entry.fd)

    def release(self, client: Client, mountpoint: str) -> Reply:
        with self._lock:
            entry = self._entries.get(mountpoint)
            if entry is None:
                return Reply(status="none", message=f"no FUSE connection of {mountpoint} is held")
            if holder := self._held_by_other(entry, client):
                return Reply(status="refused", pid=holder.pid, message=f"{mountpoint} is served by pid {holder.pid}")
            del self._entries[mountpoint]
        os.close(entry.fd)
        log.info("FUSE keeper: pid %d released %s", client.pid, mountpoint)
        return Reply(status="ok")

    def _drop(self, entry: _Entry, why: str) -> None:
        with self._lock:
            if self._entries.get(entry.mountpoint) is not entry:
                return
            del self._entries[entry.mountpoint]
        os.close(entry.fd)
        log.info("FUSE keeper: dropped %s (%s)", entry.mountpoint, why)

    def check(self, mountpoint: str | None = None) -> None:
        """Drop entries whose connection ended, is no longer mounted, or waited too long."""
        with self._lock:
            entries = [e for e in self._entries.values() if mountpoint is None or e.mountpoint == mountpoint]
        if not entries:
            return
        poller = select.poll()
        for entry in entries:
            poller.register(entry.fd, 0)  # only POLLERR/POLLHUP/POLLNVAL: requests waiting are POLLIN
        ended = {fd for fd, _ in poller.poll(0)}
        mounted = fuse_mounts()
        now = time.monotonic()
        for entry in entries:
            if entry.fd in ended:
                self._drop(entry, "the FUSE connection ended: unmounted or aborted")
            elif entry.connection is not None and (entry.mountpoint, entry.connection) not in mounted:
                self._drop(entry, "no FUSE mount of this connection at the mountpoint any more")
            elif entry.unclaimed_since is not None and now - entry.unclaimed_since > self.orphan_timeout:
                self._drop(entry, f"no worker claimed it for {self.orphan_timeout:g} s; readers now get errors")

    @staticmethod
    def _held_by_other(entry: _Entry, client: Client) -> Client | None:
        """The other client whose lease on ``entry`` is live, if any. Called under the lock.

        A lease whose socket the peer has closed counts as ended even before its thread has
        seen the EOF: a worker restarted at once (or under load) must not be refused by the
        ghost of the one it replaces. Checked without reading (POLLHUP/POLLRDHUP); the socket
        cannot be closed meanwhile, since its thread clears the lease under the lock first."""
        lease = entry.lease
        if lease is None or lease is client:
            return None
        poller = select.poll()
        poller.register(lease.sock, select.POLLRDHUP)
        ended = any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL)
                    for _, ev in poller.poll(0))
        return None if ended else lease
