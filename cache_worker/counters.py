"""Live counters of one mount, and their snapshot as the shared stats document."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class WarmProgress:
    state: str = "idle"
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    fetched: int = 0
    started: float | None = None
    finished: float | None = None
    message: str | None = None

    def rate(self) -> float:
        """Bytes per second fetched by warming, over its running time."""
        if self.started is None:
            return 0.0
        elapsed = (self.finished or time.monotonic()) - self.started
        return self.fetched / elapsed if elapsed > 0 else 0.0


@dataclass
class Counters:
    """Cumulative since start; updated from many FUSE and warming threads under one lock."""

    served_from_cache: int = 0
    served_from_source: int = 0
    fetched: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    last_error: str | None = None
    degraded: str | None = None
    #: Objects served without a check the store vouches for (see verify.py), counted once each.
    unverified_objects: int = 0
    #: Fetches whose bytes did not match the store's checksum (dropped and fetched again).
    integrity_mismatches: int = 0
    last_mismatch: str | None = None
    warm: WarmProgress = field(default_factory=WarmProgress)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_read(self, from_cache: int, from_source: int) -> None:
        with self.lock:
            self.served_from_cache += from_cache
            self.served_from_source += from_source
            if from_source:
                self.misses += 1
            else:
                self.hits += 1

    def add_unobserved_hit(self, nbytes: int) -> None:
        """A cached file opened with the kernel page cache kept: counted whole, up front."""
        with self.lock:
            self.served_from_cache += nbytes

    def add_prepaid_read(self, from_source: int) -> None:
        """A read of bytes counted up front (``add_unobserved_hit``) that reached us after all:
        bytes it had to fetch were not hits, so they move to the source column."""
        with self.lock:
            self.served_from_cache -= from_source
            self.served_from_source += from_source
            if from_source:
                self.misses += 1
            else:
                self.hits += 1

    def add_fetched(self, nbytes: int) -> None:
        with self.lock:
            self.fetched += nbytes

    def add_error(self, message: str) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = message

    def set_degraded(self, reason: str | None) -> None:
        with self.lock:
            self.degraded = reason

    def add_unverified(self) -> None:
        with self.lock:
            self.unverified_objects += 1

    def add_mismatch(self, message: str) -> None:
        with self.lock:
            self.integrity_mismatches += 1
            self.last_mismatch = message
