"""Repairing published targets after a cache worker restart.

When a worker dies, its FUSE connection is aborted: the view and every bind of it (each
published target) answer ENOTCONN. The restarted worker mounts a *new* FUSE filesystem at the
view path, but the targets still hold the dead one. Repair stacks a fresh read-only bind of the
live view on top of the dead target mount instead of unmounting it first, because:

* a mount made on top of the target is propagated to every mount that receives events from it,
  which includes a running container's copy of the volume when the pod's volumeMount uses
  ``mountPropagation: HostToContainer`` (or Bidirectional). The container's next path lookup
  then lands on the live view: no pod restart.
* unmounting the target first would remove only the host's copy; the container's copy is not a
  peer of the target's parent, so it would stay dead whatever is mounted afterwards.

Copies that stacking cannot reach (pods without mount propagation, subPath mounts) are
repaired right after, inside their own mount namespaces (inject.py). The dead layer underneath
stays until NodeUnpublishVolume detaches the whole stack (one layer per worker restart). Repairs run from a background loop woken by mount-table changes (poll on
/proc/self/mountinfo), on demand from NodeGetVolumeStats and NodePublishVolume, and once at start
so a plugin restart picks up repairs that were due while it was down.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import threading
from dataclasses import dataclass

from . import inject
from datahoard.mounts import top_mounts

from .mounter import Health, Mounter, Probe
from .state import PublishedTarget, StateStore
from .views import check_view
from .volume_lock import REPAIR, TargetLocks

log = logging.getLogger(__name__)


class Status(enum.Enum):
    HEALTHY = "healthy"
    STALE = "stale"  # readable, but bound to an older view than the one mounted now
    BROKEN = "broken"  # the FUSE view behind the target is gone (ENOTCONN) or fails
    HUNG = "hung"  # the target does not answer in time: a slow or stuck worker, not a dead one
    UNMOUNTED = "unmounted"  # nothing mounted at the target any more
    GONE = "gone"  # the target directory itself is gone


@dataclass(frozen=True)
class TargetCheck:
    status: Status
    view: Probe
    target: Probe | None
    message: str

    @property
    def repairable(self) -> bool:
        """Stack a new bind only where it helps: the target is stale/broken and the view is live."""
        return self.status in (Status.STALE, Status.BROKEN) and self.view.health is Health.OK


class Repairer:
    def __init__(self, state: StateStore, mounter: Mounter, locks: TargetLocks, probe_timeout: float,
                 repair_namespaces: bool = True) -> None:
        self.state = state
        self.mounter = mounter
        self.locks = locks
        self.probe_timeout = probe_timeout
        self.repair_namespaces = repair_namespaces

    def check(self, rec: PublishedTarget) -> TargetCheck:
        view = check_view(self.mounter, rec.view_path, self.probe_timeout)
        where = f"volume {rec.volume_id} at {rec.target_path}"
        # mountinfo before any stat: a stat of a mount point goes to its filesystem, which may hang.
        if not self.mounter.mounts_at(rec.target_path):
            if not os.path.lexists(rec.target_path):
                return TargetCheck(Status.GONE, view, None, f"{where}: the target path no longer exists")
            return TargetCheck(Status.UNMOUNTED, view, None, f"{where}: nothing is mounted at the target")
        target = self.mounter.probe(rec.target_path, self.probe_timeout)
        if target.health is Health.OK:
            if view.health is Health.OK and view.device != target.device:
                return TargetCheck(Status.STALE, view, target, f"{where}: bound to an older FUSE view than {rec.view_path}")
            return TargetCheck(Status.HEALTHY, view, target, f"{where}: healthy")
        if target.health is Health.HUNG:
            # A slow worker is not a dead one: stacking a new mount would hide requests that may
            # still complete. Report it; repair only once the connection is really gone.
            return TargetCheck(Status.HUNG, view, target, f"{where}: the FUSE view does not answer ({target.detail})")
        state = "the cache worker's FUSE view is down" if view.health is not Health.OK else "repair pending"
        return TargetCheck(Status.BROKEN, view, target,
                           f"{where}: {target.health.value} ({target.detail}); {state} ({view.health.value} at {rec.view_path})")

    def repair(self, rec: PublishedTarget, holding_lock: bool = False) -> TargetCheck:
        """Check *rec* and stack a fresh bind if that fixes it; returns the check after any repair.

        Takes the target's try-lock unless the caller holds it; when the target is busy (a
        publish or unpublish is running) the repair is skipped, the next pass retries.
        """
        if not holding_lock:
            if not self.locks.try_acquire(rec.target_path, REPAIR):
                return self.check(rec)
            try:
                return self.repair(rec, holding_lock=True)
            finally:
                self.locks.release(rec.target_path)
        if self.state.get(rec.target_path) != rec:  # unpublished or republished meanwhile
            return self.check(rec)
        check = self.check(rec)
        if not check.repairable:
            return check
        top = top_mounts(self.mounter.mounts_at(rec.target_path))
        dead = {top[0].device} if top and check.status is Status.BROKEN else set()
        log.warning("%s; re-binding %s", check.message, rec.view_path)
        self.mounter.bind_readonly(rec.view_path, rec.target_path, list(rec.mount_flags))
        after = self.check(rec)
        log.info("repaired volume %s at %s: %s", rec.volume_id, rec.target_path, after.status.value)
        if dead and after.status is Status.HEALTHY and self.repair_namespaces:
            self._repair_copies(rec, dead)
        return after

    def _repair_copies(self, rec: PublishedTarget, dead: set[str]) -> None:
        """Second stage: dead copies the stacked bind does not reach (see inject.py)."""
        try:
            targets = {t.target_path for t in self.state.all()}
            own = inject.repair_own_namespace(self.mounter, dead, rec.view_path, self.probe_timeout, targets)
            other = inject.repair_other_namespaces(dead, rec.view_path)
            if own or other:
                log.info("volume %s: re-bound %d copy(ies) on this node and %d in other mount namespaces",
                         rec.volume_id, own, other)
        except OSError as exc:
            log.error("volume %s: repairing copies of the dead view failed: %s", rec.volume_id, exc)

    def _forget(self, rec: PublishedTarget) -> None:
        """Drop the record of a target whose directory is gone and holds no mount.

        kubelet removes the target directory only after NodeUnpublishVolume succeeded, so this
        is a leftover (e.g. a node reboot wiped the mount and kubelet cleaned up the pod):
        nothing is left to repair or unpublish.
        """
        if not self.locks.try_acquire(rec.target_path, REPAIR):
            return
        try:
            if self.state.get(rec.target_path) == rec and not os.path.lexists(rec.target_path) \
                    and not self.mounter.mounts_at(rec.target_path):
                self.state.remove(rec.target_path)
                log.info("forgot volume %s at %s: the target path is gone", rec.volume_id, rec.target_path)
        finally:
            self.locks.release(rec.target_path)

    def repair_all(self) -> int:
        """One pass over every published target; returns how many were re-bound."""
        repaired = 0
        for rec in self.state.all():
            try:
                before = self.check(rec)
                if before.status is Status.GONE:
                    self._forget(rec)
                elif before.repairable and self.repair(rec).status is Status.HEALTHY:
                    repaired += 1
            except OSError as exc:
                log.error("repair of volume %s at %s failed: %s", rec.volume_id, rec.target_path, exc)
        return repaired


class MountEvents:
    """Wakes up when this mount namespace's mount table changes.

    The kernel signals POLLPRI on an open /proc/self/mountinfo after any mount or unmount, so
    the repair loop reacts as soon as a restarted worker mounts its new view instead of waiting
    for the next timer tick.
    """

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - lives as long as the loop
        self._wake_r, self._wake_w = os.pipe()  # lets stop() interrupt a wait at once
        self._poll = select.poll()
        self._poll.register(self._file.fileno(), select.POLLPRI | select.POLLERR)
        self._poll.register(self._wake_r, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Block until the mount table changes, wake() is called, or *timeout* seconds pass."""
        return bool(self._poll.poll(max(timeout, 0.0) * 1000))

    def wake(self) -> None:
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._file.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class RepairLoop:
    """Background thread: a repair pass at start, after each mount-table change, and every *interval*."""

    def __init__(self, repairer: Repairer, interval: float) -> None:
        self.repairer = repairer
        self.interval = interval
        self.passes = 0
        self._stop = threading.Event()
        self._events = MountEvents()
        self._thread = threading.Thread(target=self._run, name="csi-repair", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._events.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._events.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.repairer.repair_all()
            except Exception:  # the loop must outlive any single bad pass
                log.exception("repair pass failed")
            self.passes += 1
            self._events.wait(self.interval)
