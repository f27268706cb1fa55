"""How a worker serves its mount right now: the serving-mode state machine, and the choices
that pick a mode (passthrough, kernel opens, handover or unmount on stop).

A mount always starts on the FUSE view with the worker answering every open. Two things can
take work off the worker, independently: the kernel may take over opens (a fully cached
dataset of small files), and a direct tree may be bound over the mountpoint (``direct``).
So the mode is a pair, written as one of four states::

    state                  opens go to                    status: serving / kernel opens
    fuse                   the worker                     fuse   / no
    fuse+kernel-opens      the kernel (fanotify counts)   fuse   / yes
    direct                 the tree (FUSE underneath)     direct / no
    direct+kernel-opens    the tree (kernel opens below)  direct / yes

Events and the transitions they make (anything else is a bug and raises):

- ``FULLY_CACHED`` (completeness.py, once the last missing chunk is cached, when
  ``kernel_opens_refusal`` has no objection and fanotify is allowed): fuse → fuse+kernel-opens,
  direct → direct+kernel-opens. There is no way back: the kernel remembers the ENOSYS answer to
  an open for the whole connection. A file evicted later is read through the FUSE view's reads
  (prepaid, refetched), which is why an eviction changes no mode.
- ``TREE_BOUND`` (tree.py built and verified the tree, and the bind over the mountpoint
  succeeded): fuse → direct, fuse+kernel-opens → direct+kernel-opens.
- ``TREE_UNBOUND`` (the bind was taken off, which asks for an unmount, or shutdown removed
  it): direct → fuse, direct+kernel-opens → fuse+kernel-opens.

The direct tree's own progress (waiting, verifying, building, ready, failed) is reported
apart, in ``DirectStats``: a ready tree that could not be bound leaves the mode alone.
"""

from __future__ import annotations

import os

import enum
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    FUSE = "fuse"
    FUSE_KERNEL_OPENS = "fuse+kernel-opens"
    DIRECT = "direct"
    DIRECT_KERNEL_OPENS = "direct+kernel-opens"

    @property
    def serving(self) -> str:
        """What ``WorkerStats.serving`` (and ``datahoard status``) shows: fuse or direct."""
        return "direct" if self in (Mode.DIRECT, Mode.DIRECT_KERNEL_OPENS) else "fuse"

    @property
    def kernel_opens(self) -> bool:
        """What ``WorkerStats.kernel_opens`` shows."""
        return self in (Mode.FUSE_KERNEL_OPENS, Mode.DIRECT_KERNEL_OPENS)


class Event(enum.Enum):
    FULLY_CACHED = "fully cached"
    TREE_BOUND = "tree bound"
    TREE_UNBOUND = "tree unbound"


TRANSITIONS: dict[tuple[Mode, Event], Mode] = {
    (Mode.FUSE, Event.FULLY_CACHED): Mode.FUSE_KERNEL_OPENS,
    (Mode.DIRECT, Event.FULLY_CACHED): Mode.DIRECT_KERNEL_OPENS,
    (Mode.FUSE, Event.TREE_BOUND): Mode.DIRECT,
    (Mode.FUSE_KERNEL_OPENS, Event.TREE_BOUND): Mode.DIRECT_KERNEL_OPENS,
    (Mode.DIRECT, Event.TREE_UNBOUND): Mode.FUSE,
    (Mode.DIRECT_KERNEL_OPENS, Event.TREE_UNBOUND): Mode.FUSE_KERNEL_OPENS,
    # Unbinding what was never bound (shutdown clears leftovers either way) changes nothing.
    (Mode.FUSE, Event.TREE_UNBOUND): Mode.FUSE,
    (Mode.FUSE_KERNEL_OPENS, Event.TREE_UNBOUND): Mode.FUSE_KERNEL_OPENS,
}


class BadTransition(Exception):
    """An event the current mode does not allow (a bug in the worker, not a user error)."""


class ServingMode:
    """The current mode; thread-safe (the completeness thread, the direct-tree thread and the
    stats server all touch it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mode = Mode.FUSE

    @property
    def mode(self) -> Mode:
        return self._mode

    def allows(self, event: Event) -> bool:
        return (self._mode, event) in TRANSITIONS

    def apply(self, event: Event) -> Mode:
        with self._lock:
            new = TRANSITIONS.get((self._mode, event))
            if new is None:
                raise BadTransition(f"serving mode {self._mode.value} does not allow {event.value}")
            if new is not self._mode:
                log.info("serving mode: %s -> %s (%s)", self._mode.value, new.value, event.value)
            self._mode = new
            return new


# -- the choices ---------------------------------------------------------------------------
def use_passthrough(setting: str, largest_file: int, whole_file_max: int, total_bytes: int = 0,
                    memory_bytes: int = 0) -> bool:
    """Ask for FUSE passthrough? ``setting`` is on, off or auto: auto for a dataset with a file
    larger than one chunk, or one of more than half the node's memory (``memory_bytes``), which
    the page cache cannot keep: every epoch then reads the cache disk, where passthrough with
    the native responder is at 0.79 of local disk and the page cache with kernel opens at 0.22
    (0.63 once its reads were answered natively too, fs_backing.arm_reads: still below), warm the
    other way round: 0.45 against 0.71 (measurements in ``WorkerConfig.passthrough``)."""
    if setting == "auto":
        return largest_file > whole_file_max or (memory_bytes > 0 and total_bytes > memory_bytes // 2)
    return setting == "on"


#: Where a process's own memory limit is: cgroup v2 (in a pod, its cgroup namespace's root),
#: then v1.
MEMORY_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit(paths: tuple[str, ...] = MEMORY_LIMIT_FILES) -> int:
    """This process's memory limit in bytes (its cgroup's: the worker pod's limit on Kubernetes,
    4Gi by default), or 0 if it has none. Kernel memory the worker causes is charged to it too:
    the backing files it registers for passthrough, and the dentries and inodes they pin."""
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return 0
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < 1 << 60 else 0  # v1 writes "no limit" as a huge number
    return 0


def physical_memory() -> int:
    """The node's memory in bytes (0 if unknown): what its page cache can at most hold."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def kernel_opens_refusal(enabled: bool, passthrough_live: bool, largest_file: int,
                         whole_file_max: int) -> str | None:
    """Why opens must stay in the worker even once the dataset is fully cached, or None."""
    if not enabled:
        return "turned off (--no-kernel-opens)"
    if passthrough_live:
        # Answering an open with ENOSYS gives up passthrough for the whole connection, and the
        # two together failed reads with EIO after a handover (seen with the restart test).
        return "passthrough serves cached files"
    if largest_file > whole_file_max:
        return f"files of up to {largest_file} bytes are counted read by read"
    return None


@dataclass(frozen=True)
class StopPlan:
    """What SIGTERM/SIGINT does: hand the connection over (the mount stays for the next
    worker) or unmount."""

    handover: bool


def stop_plan(handover_possible: bool, mounted: bool) -> StopPlan:
    """Hand over only with a keeper holding the connection and a mount this worker recorded."""
    return StopPlan(handover=handover_possible and mounted)


__all__ = ["Mode", "Event", "TRANSITIONS", "BadTransition", "ServingMode", "use_passthrough", "physical_memory",
           "kernel_opens_refusal", "StopPlan", "stop_plan"]
