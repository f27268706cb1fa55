"""What wakes the direct-tree thread (direct_mode.py), so that it sleeps while nothing changes.

That thread used to wake every 0.2 s to look for repairs, for its bind and for a reason to
build, and every 30 s to remove old trees (issue 16 asks for a worker driven by events, not
pollers). Now it blocks in one poll(2) on:

- an eventfd that other threads write to (:meth:`Wakeup.wake`): the "fully cached" event
  (completeness.py), a chunk of the tree found corrupt (``DirectTrees.on_repair``), warming
  finished, shutdown. An eventfd keeps a wake-up written before the thread waits, so none is
  lost however the threads interleave;
- the mount tables ``/proc/self/mountinfo`` and ``/proc/1/mountinfo``, only while the thread
  has a reason to look at mounts (:meth:`Wakeup.watch_mounts`): its bind is over the
  mountpoint (taking it off asks for an unmount), or an old tree waits for its last mount to
  go. The kernel marks such a file POLLPRI when a mount or unmount changes its namespace's
  table (proc(5)), and the poll that reports it clears the mark; an fd opened later starts
  clear. They are not watched otherwise: a node mounts and unmounts for every pod it starts,
  and none of that concerns a tree that is only waiting or serving;
- inotify on the reference directories of old trees (:meth:`Wakeup.watch_removals`), while
  one waits to be removed: the CSI node plugin drops a tree's reference file
  (``direct/<id>.refs/*``) *after* it unmounts the pod's bind, so the mount change comes
  before the last reference is gone and only the file's removal can say so. Where inotify
  is refused (``fs.inotify.max_user_instances`` reached), the caller falls back to a timer.

A watch set up anew tells only of changes after it is in place, so the caller looks once more
before it waits (:meth:`Wakeup.new_watch`): a reference removed between its look and the watch
used to leave an old tree until some other event.

:attr:`Wakeup.count` is how many times :meth:`Wakeup.wait` returned, and
:attr:`Wakeup.timeout` the time limit of the last one (None: events only): the tests read
them to show that nothing wakes the thread while nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

#: This process's mount table and pid 1's (a tree bound into a pod shows in the host's table).
MOUNT_TABLES = ("/proc/self/mountinfo", "/proc/1/mountinfo")
#: inotify(7): a file moved out of or deleted from the directory, or the directory itself.
_IN_MOVED_FROM, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x40, 0x200, 0x400, 0x800
_REMOVALS = _IN_MOVED_FROM | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF


class Wakeup:
    """One thread's wait for events and mount-table changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._efd, select.POLLIN)
        self._tables: list[int] = []
        #: The inotify instance watching ``_watched`` (-1: none).
        self._inotify = -1
        self._watched: frozenset[Path] = frozenset()
        #: How many times ``wait`` returned (woken, a mount change, or its time limit).
        self.count = 0
        #: The time limit of the last wait (the one in progress, if any), in seconds; None: events only.
        self.timeout: float | None = None
        #: True while ``wait`` blocks: every watch it waits on is in place (tests wait for it).
        self.waiting = False
        #: A watch was set up since ``new_watch`` was last asked (``watch_mounts``, ``watch_removals``).
        self._new_watch = False

    def wake(self) -> None:
        """Make the waiting thread (or its next wait) return; safe from any thread, and after close."""
        with self._lock:
            if self._efd >= 0:
                os.eventfd_write(self._efd, 1)

    def watch_mounts(self, on: bool) -> None:
        """Also return when a mount table changes (``on``), or stop watching them."""
        if on and not self._tables:
            for table in MOUNT_TABLES:
                try:
                    fd = os.open(table, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:  # pid 1's table may be out of reach: ours still tells of our bind
                    continue
                self._poll.register(fd, select.POLLPRI)
                self._tables.append(fd)
                self._new_watch = True
        elif not on:
            self._close_tables()

    def watch_removals(self, dirs: Iterable[Path]) -> bool:
        """Also return when a file leaves one of ``dirs`` (or a directory goes); none: stop.

        False if inotify was refused: then only a time limit notices. A directory that is not
        there is skipped (nothing in it can go); the set is set up again only when it changes."""
        wanted = frozenset(dirs)
        if wanted == self._watched:
            return self._inotify >= 0 or not wanted
        self._close_inotify()
        self._watched = wanted
        if not wanted:
            return True
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.warning("cannot watch %d reference directories: %s", len(wanted), os.strerror(ctypes.get_errno()))
            return False
        for path in wanted:
            _libc.inotify_add_watch(fd, os.fsencode(path), _REMOVALS)  # -1 (ENOENT): skipped
        self._poll.register(fd, select.POLLIN)
        self._inotify = fd
        self._new_watch = True
        return True

    def new_watch(self) -> bool:
        """Whether a watch was set up since the last call. What it watches may have changed
        after the caller looked and before the watch was in place, which no event will tell:
        the caller looks once more before it waits."""
        new, self._new_watch = self._new_watch, False
        return new

    def wait(self, timeout: float | None = None) -> bool:
        """Block until woken or a watched mount table changes (True), or ``timeout`` seconds
        pass (False; None waits for events only). Wake-ups that came meanwhile count as one."""
        self.timeout = timeout
        self.waiting = True
        try:
            events = self._poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
        finally:
            self.waiting = False
        self.count += 1
        for fd, _ in events:
            try:
                if fd == self._efd:
                    os.eventfd_read(self._efd)
                elif fd == self._inotify:
                    while os.read(fd, 65536):  # what went is looked at anew by the caller
                        pass
            except BlockingIOError:
                pass
        return bool(events)

    def _close_tables(self) -> None:
        for fd in self._tables:
            self._poll.unregister(fd)
            os.close(fd)
        self._tables = []

    def _close_inotify(self) -> None:
        if self._inotify >= 0:
            self._poll.unregister(self._inotify)
            os.close(self._inotify)
            self._inotify = -1
        self._watched = frozenset()

    def close(self) -> None:
        """Only once the waiting thread has ended; later ``wake`` calls do nothing."""
        self._close_tables()
        self._close_inotify()
        with self._lock:
            if self._efd >= 0:
                os.close(self._efd)
                self._efd = -1


__all__ = ["MOUNT_TABLES", "Wakeup"]
