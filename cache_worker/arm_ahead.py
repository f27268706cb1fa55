"""Arming ahead (step 5 of ``worker.run``): once the dataset is fully cached, arm every file for
the native responder and have it remember every name, before any reader asks.

Why: the native part answers the opens of armed files and the LOOKUPs of names Python answered
before (fusell/fastopen.c), and a file is armed when Python answers an open of it. So the first
epoch after warming, and the first after every worker restart (inherited arms are checked again
by Python before they are armed), paid one Python open and one Python LOOKUP per file: about
300 and 100 us, which is what kept the epoch after ``--warm`` at 0.17 of local disk in the full
benchmark against 0.84 for the epochs after it (bench/RESULTS.md, 2026-12-06 12:43). Arming a
file ahead is what answering its open would have done, without a reader: the cache file is
checked whole and verified, registered, and armed, and the open given up at once (the arm keeps
its id); no hit is counted, since nothing was read. Names are remembered with the answer the
view's own ``lookup`` gives.

Bounded like arming on open: at most the table's arms (``BackingTable.slots``) and three
quarters of the names the native part keeps. It runs on its own thread, once per "fully cached"
event (a refresh that changes files makes the dataset not fully cached, then cached again), and
stops with the worker.
"""

from __future__ import annotations

import logging
import threading
import time

from .completeness import Completeness
from .fs import DatasetFS

log = logging.getLogger(__name__)


class ArmAhead:
    def __init__(self, view: DatasetFS, stop: threading.Event) -> None:
        self._view, self._stop = view, stop
        self._running = threading.Lock()
        #: A "fully cached" event was heard and the run it started has not ended: ``--warm
        #: --wait`` waits for this too, so the first epoch finds every file armed.
        self.pending = False

    def plan(self, completeness: Completeness) -> None:
        """Listen for the event where the native part serves (passthrough with fastopen)."""
        if self._view.native is not None:
            completeness.subscribe(self._on_fully_cached)

    def _on_fully_cached(self, full: bool) -> None:
        if full and not self._stop.is_set():
            self.pending = True  # before the thread, on the event's own thread (Completeness.busy)
            threading.Thread(target=self._run, name="arm-ahead", daemon=True).start()

    def _run(self) -> None:
        if not self._running.acquire(blocking=False):
            return  # a run is in progress; it reaches the files this event is about too
        try:
            start = time.monotonic()
            armed, names = self._view.arm_ahead(self._stop)
            log.info("armed %d files and remembered %d names for the native part in %.1f s",
                     armed, names, time.monotonic() - start)
        except Exception:  # noqa: BLE001 - arming ahead only saves Python work; serving goes on
            log.warning("arming ahead failed: opens are armed as they come", exc_info=True)
        finally:
            self.pending = False
            self._running.release()


__all__ = ["ArmAhead"]
