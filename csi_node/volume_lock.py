"""A per-target try-lock: a second operation on a busy target fails at once with ABORTED.

kubelet may retry a slow NodePublish (its own timeout is 2 minutes) while the first call still
waits for the FUSE view; waiting on a lock would pile up calls and let two of them mount on the
same path. The spec's answer is ABORTED, which kubelet treats as non-final and retries later.
The repairer takes the same lock, so a repair never races a publish or unpublish of its target.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Aborted


class TargetLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: dict[str, str] = {}  # key -> what holds it

    def try_acquire(self, key: str, holder: str) -> bool:
        with self._guard:
            if key in self._busy:
                return False
            self._busy[key] = holder
            return True

    def release(self, key: str) -> None:
        with self._guard:
            self._busy.pop(key, None)

    def holder(self, key: str) -> str | None:
        with self._guard:
            return self._busy.get(key)

    @contextmanager
    def hold(self, key: str, holder: str, volume_id: str) -> Iterator[None]:
        """Hold *key* for the block, or raise :class:`Aborted` naming what holds it."""
        if not self.try_acquire(key, holder):
            raise Aborted(
                f"volume {volume_id}: an operation is already in progress on {key} "
                f"({self.holder(key) or 'just finished'}); retry later"
            )
        try:
            yield
        finally:
            self.release(key)
