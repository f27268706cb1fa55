"""A per-target try-lock: a second operation on a busy target fails at once with ABORTED.

kubelet may retry a slow NodePublish (its own timeout is 2 minutes) while the first call still
waits for the FUSE view; waiting on a lock would pile up calls and let two of them mount on the
same path. The spec's answer is ABORTED, which kubelet treats as non-final and retries later.

The repairer takes the same lock, so a repair never races a publish or unpublish of its target.
A repair is the plugin's own short step (a probe and a mount), not a concurrent CO operation,
so an RPC that finds the lock held by the repairer waits for it (bounded) instead of failing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Aborted

#: Holder name used by the repairer; RPCs wait for it rather than being ABORTED.
REPAIR = "repair"
#: How long an RPC waits for a running repair of its target. A repair is one probe (bounded by
#: the probe timeout, 5 s by default) and one mount.
REPAIR_WAIT = 15.0


class TargetLocks:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: dict[str, str] = {}  # key -> what holds it

    def try_acquire(self, key: str, holder: str, wait_for_repair: float = 0.0) -> bool:
        deadline = time.monotonic() + wait_for_repair
        with self._cond:
            while self._busy.get(key) == REPAIR and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            if key in self._busy:
                return False
            self._busy[key] = holder
            return True

    def release(self, key: str) -> None:
        with self._cond:
            self._busy.pop(key, None)
            self._cond.notify_all()

    def holder(self, key: str) -> str | None:
        with self._cond:
            return self._busy.get(key)

    @contextmanager
    def hold(self, key: str, holder: str, volume_id: str) -> Iterator[None]:
        """Hold *key* for the block, or raise :class:`Aborted` naming what holds it."""
        if not self.try_acquire(key, holder, wait_for_repair=REPAIR_WAIT):
            raise Aborted(
                f"volume {volume_id}: an operation is already in progress on {key} "
                f"({self.holder(key) or 'just finished'}); retry later"
            )
        try:
            yield
        finally:
            self.release(key)
