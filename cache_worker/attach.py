"""Where a worker's FUSE connection comes from, and where it goes when the worker stops.

A worker either **resumes** the connection of its mountpoint that the FUSE keeper holds
(``datahoard/fuse_keeper.py``: the CSI node plugin on a node, the supervisor in standalone
mode), or **mounts** a fresh one and deposits a duplicate of its descriptor with the keeper.
Either way it keeps its keeper connection open while it serves: that is its lease, and no
second worker may serve the same connection meanwhile (the keeper refuses it).

A resumed worker must mean by every node id what the previous one meant: ids are derived from
the index (``fs.py``), so the state deposited with the connection names the index it was served
from, and a worker that opens a different index (``--refresh``, a new source) does not resume:
it lets the keeper drop the old connection, detaches that mount (its readers then see errors,
as a remount always did) and mounts afresh.

On SIGTERM a worker whose connection the keeper holds *hands over*: it stops taking requests,
answers those in flight, and exits without unmounting; requests wait in the kernel until the
next worker resumes. A SIGKILLed worker leaves requests it had read but not answered; the next
worker asks the kernel to send them again (``FUSE_NOTIFY_RESEND``). Without a keeper (none
runs, or ``--no-handover``) a stop unmounts, as before, and ``datahoard status`` says why.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from datahoard.keeper_client import KeeperClient
from datahoard.keeper_protocol import KeeperError, KeeperRefused, KeeperUnavailable

from .fusell.session import Connection, InitState, unmount
from .index import IndexSummary

log = logging.getLogger(__name__)

#: How long a starting worker waits for the previous one to let go of the connection (its
#: graceful stop answers the requests in flight first).
CLAIM_WAIT_SECONDS = 30.0


def index_identity(summary: IndexSummary) -> str:
    """What must be equal for node ids to mean the same files: the snapshot the view serves, or
    the line of refreshed snapshots it belongs to (index_refresh.py keeps ids across one)."""
    return summary.identity()


@dataclass
class Attachment:
    conn: Connection
    resumed: bool
    keeper: KeeperClient | None
    #: Why restarts are not hidden (no keeper), or None.
    note: str | None = None

    @property
    def handover(self) -> bool:
        return self.keeper is not None


class Attacher:
    """Claims before anything touches the mountpoint: on a held connection whose worker is
    down, even a ``stat`` of the mountpoint waits for a worker."""

    def __init__(self, mountpoint: Path, handover: bool, keeper_socket: Path | None = None) -> None:
        self.mountpoint = mountpoint
        self.keeper: KeeperClient | None = None
        self.note: str | None = None
        self.claimed = None
        if not handover:
            self.note = "handover is off (--no-handover): a worker restart remounts, and readers see errors meanwhile"
            return
        try:
            self.keeper = KeeperClient(keeper_socket)
        except KeeperUnavailable as exc:
            self.note = str(exc)
            return
        self.claimed = self._claim()

    def _claim(self):
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        while True:
            try:
                return self.keeper.claim(self.mountpoint)
            except KeeperRefused as exc:
                if time.monotonic() > deadline:
                    raise KeeperError(f"cannot serve {self.mountpoint}: {exc} (still, after "
                                      f"{CLAIM_WAIT_SECONDS:g} s)") from None
                time.sleep(0.2)
            except KeeperError as exc:
                log.warning("the FUSE keeper failed (%s); mounting without handover", exc)
                self.note = f"the FUSE keeper failed: {exc}"
                self.keeper.close()
                self.keeper = None
                return None

    @property
    def resuming(self) -> bool:
        return self.claimed is not None

    def resume(self, identity: str) -> Attachment | None:
        """The held connection, if it served this very index; else it is let go (and None)."""
        claimed, self.claimed = self.claimed, None
        if claimed is None:
            return None
        init = claimed.state.get("init")
        if claimed.state.get("index") == identity and init:
            log.info("resuming the FUSE connection of %s (no remount)", self.mountpoint)
            conn = Connection.resume(claimed.fd, InitState.from_json(init), str(self.mountpoint))
            return Attachment(conn, True, self.keeper)
        log.warning("the held connection of %s served another index: remounting (its readers see errors)",
                    self.mountpoint)
        try:
            self.keeper.release(self.mountpoint)
        except KeeperError as exc:
            log.warning("releasing the old connection failed: %s", exc)
        os.close(claimed.fd)
        try:
            unmount(self.mountpoint, lazy=True)
        except OSError as exc:
            log.warning("detaching the old mount at %s failed: %s", self.mountpoint, exc)
        return None

    def mount(self, fsname: str, allow_other: bool) -> Attachment:
        conn = Connection.mount(self.mountpoint, fsname=fsname, subtype="datahoard", allow_other=allow_other)
        return Attachment(conn, False, self.keeper, self.note)

    def close(self) -> None:
        if self.claimed is not None:
            os.close(self.claimed.fd)
            self.claimed = None
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None


def deposit(att: Attachment, identity: str, again: bool = False) -> None:
    """Hand the keeper a duplicate of a fresh connection; on failure, serve without handover.
    ``again``: a new keeper (the old one stopped) gets the connection this worker serves."""
    if att.keeper is None or (att.resumed and not again):
        return
    try:
        att.keeper.deposit(att.conn.mountpoint, {"init": att.conn.state.to_json(), "index": identity},
                           att.conn.fd)
    except KeeperError as exc:
        log.warning("the FUSE keeper did not take the connection (%s): restarts will remount", exc)
        att.note = f"the FUSE keeper did not take the connection: {exc}"
        att.keeper.close()
        att.keeper = None


#: Seconds between checks that the keeper still holds this worker's connection.
KEEPER_CHECK_SECONDS = 5.0


def keep_deposited(att: Attachment, identity: str, keeper_socket: Path | None, stop) -> None:
    """While serving: if the keeper goes away (the CSI plugin restarts, its DaemonSet rolls), give
    the connection to the next keeper as soon as one answers, so the worker's own next restart
    is still hidden. Without this, one plugin restart would quietly turn handover off."""
    while not stop.wait(KEEPER_CHECK_SECONDS):
        if att.keeper is not None and att.keeper.connected():
            continue
        if att.keeper is not None:
            log.warning("the FUSE keeper went away; the connection goes to the next one when it answers")
            att.keeper.close()
            att.keeper = None
            att.note = "the FUSE keeper went away; waiting for it to come back"
        try:
            client = KeeperClient(keeper_socket)
        except KeeperUnavailable:
            continue
        att.keeper, att.note = client, None
        deposit(att, identity, again=True)
        if att.keeper is not None:
            log.info("the FUSE keeper is back and holds the connection again")


def wait_until_live(session, mountpoint: Path, timeout: float = 30.0) -> bool:
    """Wait (bounded) until the kernel started the session and the view is mounted; False
    (logged) if either did not happen."""
    deadline = time.monotonic() + timeout
    while not session.ready.wait(0.05):
        if time.monotonic() > deadline:
            log.error("the kernel did not start the FUSE connection at %s", mountpoint)
            return False
    while not os.path.ismount(mountpoint):
        if time.monotonic() > deadline:
            log.error("the FUSE view did not appear at %s", mountpoint)
            return False
        time.sleep(0.01)
    return True
