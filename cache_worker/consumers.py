"""Who read the bytes: served bytes per consumer (a Kubernetes pod, or the host), bounded.

A Dataset's hit ratio says how well the cache serves *everyone*; a platform team asks how well
it serves *this job*. Every FUSE request carries the pid of the process that made it (in the
worker's pid namespace: the worker pod needs ``hostPID: true``, or every pod's pid is 0 and its
bytes are ``unattributed``). The chain from a pid to a pod:

1. ``/proc/<pid>/cgroup`` names the process's cgroup; kubelet puts every container under a pod
   cgroup whose name carries the pod's UID, in one of two forms: the systemd driver's
   ``kubepods-besteffort-pod<uid with _ for ->.slice`` and the cgroupfs driver's
   ``/kubepods/besteffort/pod<uid>/<container>`` (cgroup v1 and v2 alike; in a cgroup namespace
   the path starts with ``/..`` and may not show ``kubepods`` at all, so the pod segment alone
   is what is matched). A process in no pod is ``host``.
2. The UID becomes namespace and name through the files the CSI node plugin writes at
   NodePublishVolume (``csi_node/consumers.py``), one per published pod, in a directory only this
   Dataset's worker mounts: a tenant's pods are never visible to another Dataset's worker. A UID
   with no file (a pod that reads the view some other way) is shown by its UID.

Reading ``/proc/<pid>/stat`` and ``/proc/<pid>/cgroup`` costs about 50-60 us each on a busy
2-core machine (measured), more than a cached read's own Python cost, so lookups are cached: an
LRU of :data:`PID_CACHE` entries keyed on (pid, process start time), because pids are reused;
and in front of it the pid's last answer is trusted for :data:`REVALIDATE_SECONDS` without a
look at ``/proc`` (a pid cannot be freed and handed to a new process in another pod within a
second on a machine with ``pid_max`` in the millions; a short-lived process whose pid is gone
keeps its last answer).

The counts are saved with the worker's counters (``counters.json``, names included: a pod's
record goes when it is unpublished), so a restart continues them. Measured on the loaded 2-core
test machine: ``Counters.add_read`` costs 9 us without attribution and 15 us with it (the
trusted-pid path); the first read of a new process costs about 75 us more (two /proc reads).

**Bounded cardinality.** :class:`ConsumerTable` tracks at most :data:`TRACKED` consumers exactly
(beyond that the one with the fewest bytes is folded, permanently, into ``other``) and exports
the top :data:`TOP_N` (20) by bytes served; every other consumer is summed into one ``other``
series. So a worker exports at most 21 consumers, whatever the churn of pods. The sum over all
series is the worker's total and never falls; ``other`` alone can fall when a consumer climbs
into the top 20 (its bytes move to its own series).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from datahoard import pod_records

log = logging.getLogger(__name__)

#: Consumers exported by name (Prometheus series, ``/stats``); the rest are ``other``.
TOP_N = 20
#: Consumers tracked exactly; more are folded into ``other`` (fewest bytes first).
TRACKED = 256
#: (pid, start time) -> consumer lookups remembered.
PID_CACHE = 4096
#: Seconds a pid's answer is trusted without reading /proc again.
REVALIDATE_SECONDS = 1.0

HOST = "host"
#: pid 0: the kernel could not name the reader in the worker's pid namespace (no hostPID).
UNATTRIBUTED = "unattributed"
OTHER = "other"

# A pod cgroup segment: "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid with _>.slice"
# (systemd). UIDs are UUIDs; a static pod's is 32 hex digits.
_POD_SEGMENT = re.compile(
    r"(?:^|/)(?:kubepods(?:-[a-z]+)?-)?pod"
    r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"
    r"(?:\.slice)?(?=/|$)"
)


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a ``/proc/<pid>/cgroup`` document (v1, v2 or hybrid), or None.

    The unified (``0::``) line is preferred; on a v1-only node any controller's line will do
    (kubelet puts a container in the same pod cgroup in every hierarchy)."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    lines.sort(key=lambda parts: parts[0] != "0")
    for parts in lines:
        found = _POD_SEGMENT.search(parts[2].strip())
        if found:
            return found.group(1).replace("_", "-")
    return None


def start_time(stat: bytes) -> int:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot): with the pid, a process's
    identity (the command name, field 2, may hold spaces and parentheses)."""
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class Consumer:
    """Who read: a pod (by UID) or ``host`` / ``unattributed`` (uid empty)."""

    uid: str = ""
    kind: str = "pod"  # pod | host | unattributed


HOST_CONSUMER = Consumer("", HOST)
UNATTRIBUTED_CONSUMER = Consumer("", UNATTRIBUTED)


class PidResolver:
    """pid -> :class:`Consumer`, through ``/proc`` (``proc`` overridable for tests)."""

    def __init__(self, proc: Path = Path("/proc"), clock=time.monotonic) -> None:
        self.proc = proc
        self._clock = clock
        self._lru: OrderedDict[tuple[int, int], Consumer] = OrderedDict()
        self._recent: dict[int, tuple[float, Consumer]] = {}
        self._lock = threading.Lock()

    def resolve(self, pid: int) -> Consumer:
        if pid <= 0:
            return UNATTRIBUTED_CONSUMER
        now = self._clock()
        seen = self._recent.get(pid)
        if seen is not None and seen[0] > now:
            return seen[1]
        try:
            key = (pid, start_time((self.proc / str(pid) / "stat").read_bytes()))
        except (OSError, ValueError, IndexError):
            # Gone already (fanotify's events come after the open: a short-lived opener may
            # have exited): its last answer if there is one, else unattributed. Not the host:
            # nothing says it was not in a pod.
            return seen[1] if seen is not None else UNATTRIBUTED_CONSUMER
        with self._lock:
            consumer = self._lru.get(key)
            if consumer is not None:
                self._lru.move_to_end(key)
        if consumer is None:
            consumer = self._lookup(pid)
            with self._lock:
                self._lru[key] = consumer
                while len(self._lru) > PID_CACHE:
                    self._lru.popitem(last=False)
        with self._lock:
            if len(self._recent) >= PID_CACHE:
                self._recent.clear()
            self._recent[pid] = (now + REVALIDATE_SECONDS, consumer)
        return consumer

    def _lookup(self, pid: int) -> Consumer:
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return UNATTRIBUTED_CONSUMER  # exited between its stat and its cgroup
        uid = pod_uid_from_cgroup(text)
        return Consumer(uid) if uid else HOST_CONSUMER


class PodNames:
    """Pod UID -> (namespace, name), from the files the CSI node plugin writes for this Dataset
    (:mod:`datahoard.pod_records`). A name once seen is kept after its
    file goes (the pod unpublished: its bytes still need a name)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._names: dict[str, tuple[str, str]] = {}
        self._scanned = 0.0
        self._lock = threading.Lock()  # the stats handler and the counters' saver both ask

    def get(self, uid: str) -> tuple[str, str] | None:
        with self._lock:
            if uid not in self._names and self.directory is not None and time.monotonic() - self._scanned > 1.0:
                self._scan()
            return self._names.get(uid)

    def remember(self, uid: str, namespace: str, name: str) -> None:
        with self._lock:
            self._names.setdefault(uid, (namespace, name))

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        for pod in pod_records.read_all(self.directory):
            self._names[pod.uid] = (pod.namespace, pod.name)
        while len(self._names) > 4 * TRACKED:  # bounded too: oldest first
            self._names.pop(next(iter(self._names)))


@dataclass
class Usage:
    from_cache: int = 0
    from_source: int = 0

    @property
    def bytes(self) -> int:
        return self.from_cache + self.from_source

    @property
    def hit_ratio(self) -> float | None:
        return self.from_cache / self.bytes if self.bytes else None


@dataclass(frozen=True)
class ConsumerUsage:
    namespace: str
    pod: str
    from_cache: int
    from_source: int


class ConsumerTable:
    """Served bytes per consumer: at most :data:`TRACKED` tracked, :data:`TOP_N` exported."""

    def __init__(self, resolver: PidResolver | None = None, names: PodNames | None = None,
                 top_n: int = TOP_N, tracked: int = TRACKED) -> None:
        self.resolver = resolver or PidResolver()
        self.names = names or PodNames(None)
        self.top_n, self.tracked = top_n, tracked
        self._usage: dict[Consumer, Usage] = {}
        self._folded = Usage()
        self._lock = threading.Lock()
        #: Pods whose names are known (``add`` asks for the others' until they are).
        self._named: set[Consumer] = set()

    def add(self, pid: int, from_cache: int, from_source: int) -> None:
        """Bytes served to ``pid``; ``from_cache`` may be negative (a prepaid read that needed
        the source moves its bytes between the columns, see ``Counters.add_prepaid_read``)."""
        consumer = self.resolver.resolve(pid)
        if consumer.uid and consumer not in self._named:
            # Learn the pod's name while it reads: its record goes when it is unpublished, and a
            # short job could finish before the first stats poll asked (seen in the node tier).
            if self.names.get(consumer.uid) is not None:
                if len(self._named) >= 4 * TRACKED:
                    self._named.clear()
                self._named.add(consumer)
        with self._lock:
            usage = self._usage.get(consumer)
            if usage is None:
                if len(self._usage) >= self.tracked:
                    self._fold_smallest()
                usage = self._usage[consumer] = Usage()
            usage.from_cache = max(0, usage.from_cache + from_cache)
            usage.from_source += from_source

    def _fold_smallest(self) -> None:
        smallest = min(self._usage, key=lambda c: self._usage[c].bytes)
        gone = self._usage.pop(smallest)
        self._folded.from_cache += gone.from_cache
        self._folded.from_source += gone.from_source

    def snapshot(self) -> list[ConsumerUsage]:
        """The top :attr:`top_n` consumers by bytes, then ``other`` (if anything is in it)."""
        with self._lock:
            ranked = sorted(self._usage.items(), key=lambda item: item[1].bytes, reverse=True)
            rest = Usage(self._folded.from_cache, self._folded.from_source)
        out = []
        for consumer, usage in ranked[: self.top_n]:
            namespace, pod = self.label(consumer)
            out.append(ConsumerUsage(namespace, pod, usage.from_cache, usage.from_source))
        for _consumer, usage in ranked[self.top_n :]:
            rest.from_cache += usage.from_cache
            rest.from_source += usage.from_source
        if rest.bytes:
            out.append(ConsumerUsage("", OTHER, rest.from_cache, rest.from_source))
        return out

    def dump(self) -> dict:
        """The counts as plain data, names included (a pod's record is gone once it is
        unpublished), for ``counters.json``: a worker restart continues them."""
        with self._lock:
            items = list(self._usage.items())
            folded = [self._folded.from_cache, self._folded.from_source]
        return {"tracked": [[c.uid, c.kind, *self.label(c), u.from_cache, u.from_source] for c, u in items],
                "folded": folded}

    def load(self, data: dict) -> None:
        """Continue from :meth:`dump`'s data; raises ValueError/TypeError/KeyError when it is not."""
        rows = [(str(uid), str(kind), str(ns), str(pod), int(cache), int(source))
                for uid, kind, ns, pod, cache, source in data["tracked"]]
        folded = [int(v) for v in data["folded"]]
        if len(folded) != 2 or min([*folded, *(min(r[4], r[5]) for r in rows)] or [0]) < 0:
            raise ValueError("consumer counts must be whole numbers >= 0")
        with self._lock:
            for uid, kind, ns, pod, cache, source in rows[: self.tracked]:
                consumer = Consumer(uid, kind)
                if kind == "pod" and ns:
                    self.names.remember(uid, ns, pod)
                self._usage[consumer] = Usage(cache, source)
            self._folded = Usage(*folded)

    def label(self, consumer: Consumer) -> tuple[str, str]:
        """(namespace, pod) as exported: a pod's names, its UID if unknown, or ("", kind)."""
        if consumer.kind != "pod":
            return "", consumer.kind
        named = self.names.get(consumer.uid)
        return named if named is not None else ("", consumer.uid)
