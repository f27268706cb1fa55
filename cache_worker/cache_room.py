"""Room again on a full cache disk: the cache-room thread of a worker.

While the cache disk is full, look for room every second (``DatasetCache.recheck_room``, a
statvfs): once the kernel answers reads itself, no fill comes to notice it (issue 17). Warming
that ran meanwhile read what it could not store through and ended: warm again, for the rest.

The one timed loop a worker keeps: a full disk gets room back without telling this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .dataset import DatasetCache

log = logging.getLogger(__name__)

#: How often a worker whose cache disk filled looks for room again (a statvfs while full).
ROOM_CHECK_SECONDS = 1.0


class RoomWatch:
    def __init__(self, cache: DatasetCache, stop: threading.Event, warm_again: Callable[[], None]) -> None:
        self._cache, self._stop, self._warm_again = cache, stop, warm_again

    def start(self) -> None:
        threading.Thread(target=self._run, name="cache-room", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(ROOM_CHECK_SECONDS):
            if self._cache.recheck_room() and not self._stop.is_set():
                self._warm_again()


__all__ = ["RoomWatch", "ROOM_CHECK_SECONDS"]
