"""Live counters of one mount, persisted in its cache directory so a restart continues them.

The Dataset's hit ratio is the sum of these counters over nodes: if a worker restart reset them,
the figure a platform team watches would fall to 0.000 every time a pod is replaced. So the
cumulative counters are written to ``<cache dir>/counters.json`` every
:data:`SAVE_INTERVAL` seconds and at shutdown (a temporary file, fsync, rename, fsync of the
directory: a crash leaves the previous file or the new one, never a torn one), and read back when
the worker opens its cache directory. What a SIGKILL (or power loss) can lose is at most the
counts of the last interval; a damaged or foreign file is set aside with a log line and counting
starts from zero, never from garbage.

The same saver thread samples the served-byte counters each interval (wall-clock time, so the
samples survive a restart too) for the *recent* hit ratio: bytes served in the last
:data:`RECENT_WINDOW` seconds, which shows what the current epoch sees rather than the lifetime
average that a long history pins in place.

**Hit accounting: the rules, all here.** Every served byte is counted exactly once, in one of two
columns (from cache, from source), and attributed to the reading pod (consumers.py). Other
modules only report events, through these methods; none keeps a count of its own:

- a read the worker answers (``DatasetCache.read``): bytes already in the store are from cache,
  bytes fetched for this reader (by this read or its read-ahead) are from source; one
  ``add_read`` per request, a hit if nothing came from the source, else a miss;
- an open the kernel will answer without us (``DatasetFS.open``: passthrough of a file whole in
  the cache, or ``keep_cache`` of a cached file of at most one chunk): the whole file is counted
  from cache at open (``add_unobserved_hit``) and the handle is marked prepaid; a passed-through
  open of a large file thus counts the whole file, however little is read (README says so);
- a prepaid handle's read that reaches us after all (the kernel dropped its copy):
  ``add_prepaid_read`` counts nothing again for cached bytes and moves fetched bytes from the
  cache column to the source column;
- an open the kernel made itself (kernel opens, serving.py): fanotify reports it
  (open_watch.py) and it is counted as the FUSE view's open would have been
  (``add_unobserved_hit``); a stats snapshot drains the queue first, so the copy is current;
- reads through a direct tree never reach the worker either: fanotify reports each open of one
  of its files (direct_opens.py), counted the same way (``add_unobserved_hit``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .consumers import ConsumerTable

log = logging.getLogger(__name__)

#: Seconds between saves of the counters (and between recent-ratio samples).
SAVE_INTERVAL = 5.0
#: Seconds the recent hit ratio looks back.
RECENT_WINDOW = 600.0
#: The file's layout version; another version is not read (counting starts afresh).
_FORMAT = 1
#: The counters that are cumulative and therefore persisted.
PERSISTED = ("served_from_cache", "served_from_source", "fetched", "hits", "misses", "errors",
             "unverified_objects", "integrity_mismatches")


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
    """Cumulative over the cache directory's life (see :meth:`persist`); updated from many FUSE
    and warming threads under one lock."""

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
    #: (wall time, served from cache, served from source), oldest first, for the recent ratio.
    samples: deque = field(default_factory=deque, repr=False)
    _saver: "CounterSaver | None" = field(default=None, repr=False)
    #: Served bytes per reading pod (consumers.py), when attribution is on; fed outside the lock.
    consumers: "ConsumerTable | None" = field(default=None, repr=False)

    # -- persistence -----------------------------------------------------------------------
    def persist(self, cache_dir: Path, interval: float = SAVE_INTERVAL) -> None:
        """Continue from the counts saved in ``cache_dir`` and keep saving them there.

        Called once the worker holds the cache directory's lock (one writer per file)."""
        self._saver = CounterSaver(self, Path(cache_dir) / "counters.json", interval)
        self._saver.load()
        with self.lock:
            self._sample(time.time())  # the recent window starts now, not at the first save
        self._saver.start()

    def stop_persisting(self) -> None:
        """Save a last time and stop the saver (at shutdown; harmless when never started)."""
        if self._saver is not None:
            self._saver.stop()
            self._saver = None

    def _sample(self, now: float) -> None:
        """Record the served counters at ``now`` (caller holds the lock); keep one window."""
        self.samples.append((now, self.served_from_cache, self.served_from_source))
        while len(self.samples) > 1 and self.samples[1][0] <= now - RECENT_WINDOW:
            self.samples.popleft()

    def recent(self, now: float | None = None) -> tuple[float, int, int]:
        """(seconds covered, bytes served from cache, bytes served) over the recent window.

        Measured from the oldest sample at least :data:`RECENT_WINDOW` old (or the oldest there
        is, just after a first start) to the live counters now. Caller holds the lock."""
        now = time.time() if now is None else now
        if not self.samples:
            return 0.0, 0, 0
        start = self.samples[0]
        for sample in self.samples:
            if sample[0] <= now - RECENT_WINDOW:
                start = sample
            else:
                break
        cache = max(0, self.served_from_cache - start[1])
        source = max(0, self.served_from_source - start[2])
        return max(0.0, now - start[0]), cache, cache + source

    def add_read(self, from_cache: int, from_source: int, pid: int = 0) -> None:
        """A read served to process ``pid`` (the FUSE request's; 0: unknown)."""
        if self.consumers is not None:
            self.consumers.add(pid, from_cache, from_source)
        with self.lock:
            self.served_from_cache += from_cache
            self.served_from_source += from_source
            if from_source:
                self.misses += 1
            else:
                self.hits += 1

    def add_unobserved_hit(self, nbytes: int, pid: int = 0) -> None:
        """A cached file opened with the kernel page cache kept: counted whole, up front."""
        if self.consumers is not None:
            self.consumers.add(pid, nbytes, 0)
        with self.lock:
            self.served_from_cache += nbytes

    def add_prepaid_read(self, from_source: int, pid: int = 0) -> None:
        """A read of bytes counted up front (``add_unobserved_hit``) that reached us after all:
        bytes it had to fetch were not hits, so they move to the source column."""
        if self.consumers is not None and from_source:
            self.consumers.add(pid, -from_source, from_source)
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


class CounterSaver:
    """The thread that writes :class:`Counters` to one file, atomically, every ``interval``."""

    def __init__(self, counters: Counters, path: Path, interval: float) -> None:
        self.counters, self.path, self.interval = counters, path, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # log a failing save once, not every interval of a full disk

    def load(self) -> None:
        """Continue from the saved file; set aside one that cannot be read (and say so)."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a version-{_FORMAT} counters file")
            counts = {k: data["counters"][k] for k in PERSISTED if k in data["counters"]}
            if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
                raise ValueError("counts must be whole numbers >= 0")
            samples = [(float(t), int(c), int(s)) for t, c, s in data.get("samples", [])]
            consumers = data.get("consumers")
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            aside = self.path.with_suffix(".json.unreadable")
            log.warning("counters in %s are unreadable (%s): moved to %s, counting from zero",
                        self.path, exc, aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return
        with self.counters.lock:
            for key, value in counts.items():
                setattr(self.counters, key, value)
            self.counters.samples.extend(s for s in samples if s[1] <= counts.get("served_from_cache", 0))
        if consumers is not None and self.counters.consumers is not None:
            try:
                self.counters.consumers.load(consumers)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("per-consumer counts in %s are unreadable (%s): counting them from zero", self.path, exc)
        log.info("continuing the counters saved at %s (%d bytes served so far)", data.get("saved_at"),
                 counts.get("served_from_cache", 0) + counts.get("served_from_source", 0))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="counters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.save()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.save()

    def save(self) -> None:
        """Write the counters (and the recent-ratio samples) atomically; log, never raise: a
        full disk must not stop serving, only the persistence of the last counts."""
        now = time.time()
        with self.counters.lock:
            self.counters._sample(now)
            data = {"format": _FORMAT, "saved_at": now,
                    "counters": {k: getattr(self.counters, k) for k in PERSISTED},
                    "samples": list(self.counters.samples)}
        if self.counters.consumers is not None:
            data["consumers"] = self.counters.consumers.dump()
        try:
            fd, tmp = tempfile.mkstemp(prefix=".counters.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(data, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot save the counters to %s: %s (retried every %.0f s)",
                            self.path, exc, self.interval)
            self._failing = True
            return
        if self._failing:
            log.info("the counters are saved to %s again", self.path)
            self._failing = False
