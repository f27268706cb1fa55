"""Kernel opens (step 5 of ``worker.run``): on the "fully cached" event (completeness.py), a
dataset of small files stops sending opens to the worker (``DatasetFS.serve_opens_in_kernel``),
unless a rule of ``serving.kernel_opens_refusal`` keeps them there. One way: the kernel keeps
the ENOSYS answer for the connection; an eviction later changes nothing (serving.py)."""

from __future__ import annotations

import logging
import threading

from .completeness import Completeness
from .fs import DatasetFS
from .serving import Event, ServingMode, kernel_opens_refusal

log = logging.getLogger(__name__)


class KernelOpens:
    def __init__(self, view: DatasetFS, mode: ServingMode, stop: threading.Event) -> None:
        self._view, self._mode, self._stop = view, mode, stop
        self._given_up = False

    def plan(self, completeness: Completeness, enabled: bool, passthrough_live: bool, largest_file: int,
             whole_file_max: int) -> None:
        """Listen for the event, or log why opens stay in the worker."""
        why = kernel_opens_refusal(enabled, passthrough_live, largest_file, whole_file_max)
        if why is not None:
            if enabled:
                log.info("opens stay in the worker: %s", why)
            return
        completeness.subscribe(self._on_fully_cached)

    def _on_fully_cached(self, full: bool) -> None:
        if not full or self._given_up or self._stop.is_set() or not self._mode.allows(Event.FULLY_CACHED):
            return
        try:
            self._view.serve_opens_in_kernel()
        except OSError as exc:  # fanotify not allowed here: the worker keeps answering opens
            log.info("opens stay in the worker: %s", exc)
            self._given_up = True
            return
        self._mode.apply(Event.FULLY_CACHED)
        log.info("the dataset is cached: the kernel serves opens now (counted with fanotify, by %s)",
                 self._view.open_watch_mode)


__all__ = ["KernelOpens"]
