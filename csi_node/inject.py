"""Repairing the copies of a dead volume that stacking on the target cannot reach.

Stacking a fresh bind on the target (recovery.py) reaches containers whose volumeMount has
HostToContainer or Bidirectional propagation. Two kinds of copies keep the dead mount anyway:

* a container with the default propagation (None): its volume is a private copy, made when the
  container started;
* a ``subPath`` mount: a bind of a *subdirectory* of the dead view, on the host and in the
  container, which no event on the target's root replaces.

After each repair, this module looks through every mount namespace it can see
(``/proc/<pid>/ns/mnt``; the plugin needs ``hostPID: true`` to see the pods') for mounts that are
on top of their mount point, carry the dead device number, and answer ENOTCONN; on each it
places a read-only clone of the same directory of the live view (``nsmount``). The application
then sees the same thing as with HostToContainer: new opens work, old descriptors stay dead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from datahoard.mounts import MountEntry, read_mountinfo, top_mounts

from . import nsmount
from .mounter import Health, Mounter

log = logging.getLogger(__name__)

#: A helper joins a namespace, statvfs()s one mount and attaches a tree; if it takes longer, the
#: mount is hung rather than dead and is left alone.
HELPER_TIMEOUT = 10.0


@dataclass(frozen=True)
class StaleCopy:
    pid: int  # a process in the namespace (any one; the namespace is what counts)
    namespace: int  # inode of /proc/<pid>/ns/mnt
    mountpoint: str
    root: str  # directory of the view this copy shows ("/" or a subPath)


def _namespaces(own: int) -> dict[int, int]:
    """namespace inode -> one pid in it, for every mount namespace but ours."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{name}/ns/mnt").st_ino
        except OSError:  # gone, or a kernel thread
            continue
        if ns != own and ns not in found:
            found[ns] = int(name)
    return found


def find_stale_copies(dead_devices: set[str]) -> list[StaleCopy]:
    """Top-of-stack mounts with one of *dead_devices* ("major:minor"), in every other namespace."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    copies = []
    for ns, pid in _namespaces(own).items():
        try:
            entries = read_mountinfo(f"/proc/{pid}/mountinfo")
        except OSError:
            continue
        copies += [StaleCopy(pid, ns, e.mountpoint, e.root) for e in top_mounts(entries) if e.device in dead_devices]
    return copies


def _view_dir(view_path: str, root: str) -> str:
    return os.path.join(view_path, root.lstrip("/")) if root not in ("", "/") else view_path


def repair_own_namespace(mounter: Mounter, dead_devices: set[str], view_path: str, probe_timeout: float,
                         skip: set[str]) -> int:
    """subPath binds (and any other copy) in the plugin's own namespace; *skip*: paths handled."""
    repaired = 0
    for entry in top_mounts(_own_entries()):
        if entry.device not in dead_devices or entry.mountpoint in skip:
            continue
        if mounter.probe(entry.mountpoint, probe_timeout).health is not Health.DISCONNECTED:
            continue
        fd = nsmount.clone_readonly(_view_dir(view_path, entry.root))
        try:
            nsmount.attach(fd, entry.mountpoint)
        finally:
            os.close(fd)
        log.warning("re-bound a copy of the dead view at %s (view dir %s)", entry.mountpoint, entry.root)
        repaired += 1
    return repaired


def _own_entries() -> list[MountEntry]:
    return read_mountinfo()


def repair_other_namespaces(dead_devices: set[str], view_path: str) -> int:
    """Attach a clone of the live view on every dead copy found in other namespaces."""
    repaired = 0
    for copy in find_stale_copies(dead_devices):
        try:
            fd = nsmount.clone_readonly(_view_dir(view_path, copy.root))
        except OSError as exc:
            log.error("cannot clone %s for %s in pid %d's namespace: %s", view_path, copy.mountpoint, copy.pid, exc)
            continue
        try:
            result = subprocess.run(
                [sys.executable, "-m", "datahoard.csi_node.nsmount", str(fd), f"/proc/{copy.pid}/ns/mnt", copy.mountpoint],
                pass_fds=[fd], capture_output=True, text=True, timeout=HELPER_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            log.warning("mount at %s in pid %d's namespace does not answer; left alone", copy.mountpoint, copy.pid)
            continue
        finally:
            os.close(fd)
        if result.returncode == nsmount.EXIT_DONE:
            log.warning("re-bound the dead volume at %s in the mount namespace of pid %d", copy.mountpoint, copy.pid)
            repaired += 1
        elif result.returncode != nsmount.EXIT_NOT_DEAD:
            log.error("re-binding %s in pid %d's namespace failed: %s", copy.mountpoint, copy.pid, result.stderr.strip())
    return repaired
