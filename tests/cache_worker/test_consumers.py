"""Per-consumer attribution on plain data: cgroup lines as kubelet's two drivers write them
(cgroup v1, v2, hybrid, inside a cgroup namespace), the pid lookup's cache (pids are reused),
and the bounded table (top N, ``other``, folding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datahoard.cache_worker.consumers import (
    HOST_CONSUMER, OTHER, UNATTRIBUTED, UNATTRIBUTED_CONSUMER, Consumer, ConsumerTable, PidResolver, PodNames,
    pod_uid_from_cgroup, start_time,
)
from datahoard.cache_worker.counters import Counters

UID = "3b1e6e42-8c7e-4c83-9d4f-0a9e1f5c2b7d"
SYSTEMD_UID = UID.replace("-", "_")

# Copied from nodes: containerd + systemd driver on cgroup v2 (kubeadm default since 1.22).
SYSTEMD_V2 = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/"
              "cri-containerd-5a0c1f2e9d8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c.scope\n")
# Docker + cgroupfs driver on cgroup v1 (older nodes): one line per hierarchy.
CGROUPFS_V1 = "".join(
    f"{n}:{ctrl}:/kubepods/burstable/pod{UID}/9f3c2a1b0e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b\n"
    for n, ctrl in [(12, "pids"), (11, "memory"), (10, "cpu,cpuacct"), (1, "name=systemd")])
CGROUPFS_V2 = f"0::/kubepods/besteffort/pod{UID}/4a8b0c1d2e3f\n"
# Guaranteed QoS has no QoS level in the path.
SYSTEMD_GUARANTEED_V1 = (f"11:memory:/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-0123abcd.scope\n"
                         f"1:name=systemd:/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-0123abcd.scope\n")
# Hybrid: the unified line is "/" (systemd), the pod shows in the v1 lines.
HYBRID = "0::/\n" + CGROUPFS_V1
# Read from a container in its own cgroup namespace: relative to the reader's root.
IN_CGROUP_NS = f"0::/../../kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-77aa.scope\n"
STATIC_POD = "0::/kubepods/burstable/pod0f1e2d3c4b5a69788796a5b4c3d2e1f0/abc\n"


@pytest.mark.parametrize("text", [SYSTEMD_V2, CGROUPFS_V1, CGROUPFS_V2, SYSTEMD_GUARANTEED_V1, HYBRID,
                                  IN_CGROUP_NS], ids=["systemd-v2", "cgroupfs-v1", "cgroupfs-v2",
                                                      "systemd-guaranteed-v1", "hybrid", "cgroupns"])
def test_pod_uid_from_both_drivers(text):
    assert pod_uid_from_cgroup(text) == UID


def test_static_pod_uid():
    assert pod_uid_from_cgroup(STATIC_POD) == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.mark.parametrize("text", [
    "0::/\n",
    "0::/system.slice/containerd.service\n",
    "0::/user.slice/user-0.slice/session-3.scope\n",
    "0::/machine.slice/libpod-9a8b7c6d.scope\n",  # podman: "pod" but no UID
    "4:memory:/process_api/3b4ee4e13527a942a52d23997de09465\n",
    f"0::/kubepods/besteffort/xpod{UID}/c\n",  # pod must start a segment
    "",
])
def test_not_a_pod(text):
    assert pod_uid_from_cgroup(text) is None


def test_start_time_survives_odd_command_names():
    stat = b"4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10"
    assert start_time(stat) == 987654


# -- pid lookups: a /proc of real files, a clock the test moves --------------------------------
class Proc:
    def __init__(self, root: Path) -> None:
        self.root = root

    def process(self, pid: int, started: int, cgroup: str) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_bytes(f"{pid} (reader) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {started} 0 0".encode())
        (d / "cgroup").write_text(cgroup)

    def exit(self, pid: int) -> None:
        for f in (self.root / str(pid)).iterdir():
            f.unlink()
        (self.root / str(pid)).rmdir()


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_reused_pid_is_a_new_consumer(tmp_path):
    proc, clock = Proc(tmp_path), Clock()
    resolver = PidResolver(tmp_path, clock)
    proc.process(50, started=1000, cgroup=CGROUPFS_V2)
    assert resolver.resolve(50) == Consumer(UID)
    # The pod's process exits; the pid goes to a host process, started later.
    proc.exit(50)
    proc.process(50, started=2000, cgroup="0::/system.slice/cron.service\n")
    clock.now += 5
    assert resolver.resolve(50) == HOST_CONSUMER


def test_the_same_process_is_looked_up_once(tmp_path):
    proc, clock = Proc(tmp_path), Clock()
    resolver = PidResolver(tmp_path, clock)
    proc.process(7, started=10, cgroup=SYSTEMD_V2)
    assert resolver.resolve(7) == Consumer(UID)
    # Its cgroup file changes (it cannot, for a pod's process): the cached answer stands, both
    # inside the trust window and after it (same pid, same start time).
    (tmp_path / "7" / "cgroup").write_text("0::/\n")
    assert resolver.resolve(7) == Consumer(UID)
    clock.now += 5
    assert resolver.resolve(7) == Consumer(UID)


def test_exited_and_unknown_pids(tmp_path):
    proc, clock = Proc(tmp_path), Clock()
    resolver = PidResolver(tmp_path, clock)
    assert resolver.resolve(0).kind == UNATTRIBUTED
    assert resolver.resolve(999) == UNATTRIBUTED_CONSUMER  # never seen, already gone: not "host"
    proc.process(8, started=1, cgroup=CGROUPFS_V1)
    assert resolver.resolve(8) == Consumer(UID)
    proc.exit(8)
    clock.now += 5
    assert resolver.resolve(8) == Consumer(UID)  # gone: its last answer, for its last reads


# -- the bounded table ----------------------------------------------------------------------
class Pids(PidResolver):
    """pid n -> pod "uid-n" (pid 1: the host), without /proc: the table's rules alone."""

    def resolve(self, pid: int) -> Consumer:
        return HOST_CONSUMER if pid == 1 else Consumer(f"uid-{pid}")


def test_top_n_and_other(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"uid": "uid-2", "namespace": "team-a", "name": "trainer-0"}))
    table = ConsumerTable(Pids(), PodNames(tmp_path), top_n=2, tracked=10)
    table.add(1, 10, 0)
    table.add(2, 300, 100)
    table.add(3, 50, 0)
    table.add(4, 0, 20)
    got = [(c.namespace, c.pod, c.from_cache, c.from_source) for c in table.snapshot()]
    assert got == [("team-a", "trainer-0", 300, 100), ("", "uid-3", 50, 0), ("", OTHER, 10, 20)]


def test_tracking_is_bounded_and_totals_stay_exact():
    table = ConsumerTable(Pids(), top_n=3, tracked=5)
    total = 0
    for pid in range(2, 1002):
        table.add(pid, pid, 1)
        total += pid + 1
    assert len(table._usage) == 5
    snap = table.snapshot()
    assert len(snap) == 4 and snap[-1].pod == OTHER
    assert [c.pod for c in snap[:3]] == ["uid-1001", "uid-1000", "uid-999"]
    assert sum(c.from_cache + c.from_source for c in snap) == total


def test_a_prepaid_read_moves_bytes_to_the_source_column():
    counters = Counters()
    counters.consumers = ConsumerTable(Pids(), top_n=5)
    counters.add_unobserved_hit(1000, pid=2)  # opened cached: counted whole
    counters.add_prepaid_read(300, pid=2)  # the kernel dropped it; 300 bytes came from the source
    counters.add_read(0, 50, pid=3)
    snap = {c.pod: (c.from_cache, c.from_source) for c in counters.consumers.snapshot()}
    assert snap == {"uid-2": (700, 300), "uid-3": (0, 50)}
    assert (counters.served_from_cache, counters.served_from_source) == (700, 350)


def test_names_come_from_this_datasets_records_only(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    (theirs / "x.json").write_text(json.dumps({"uid": "uid-9", "namespace": "other-team", "name": "p"}))
    (mine / "broken.json").write_text("{not json")
    table = ConsumerTable(Pids(), PodNames(mine))
    table.add(9, 5, 0)
    assert [(c.namespace, c.pod) for c in table.snapshot()] == [("", "uid-9")]


def test_counts_and_names_survive_a_restart(tmp_path):
    from datahoard.cache_worker.counters import CounterSaver

    records = tmp_path / "records"
    records.mkdir()
    (records / "a.json").write_text(json.dumps({"uid": "uid-2", "namespace": "team-a", "name": "trainer-0"}))
    before = Counters()
    before.consumers = ConsumerTable(Pids(), PodNames(records), top_n=1, tracked=2)
    before.add_read(100, 50, pid=2)
    before.add_read(7, 0, pid=3)
    before.add_read(1, 0, pid=4)  # the table is full: uid-3 (7 bytes) is folded into other
    CounterSaver(before, tmp_path / "counters.json", 5).save()
    (records / "a.json").unlink()  # the pod was unpublished meanwhile

    after = Counters()
    after.consumers = ConsumerTable(Pids(), PodNames(records), top_n=1, tracked=2)
    CounterSaver(after, tmp_path / "counters.json", 5).load()
    assert after.consumers.snapshot() == before.consumers.snapshot()
    assert after.consumers.snapshot()[0].pod == "trainer-0"
    after.add_read(0, 10, pid=2)
    assert after.consumers.snapshot()[0].from_source == 60


def test_damaged_consumer_counts_start_afresh_and_the_rest_is_kept(tmp_path):
    from datahoard.cache_worker.counters import CounterSaver

    path = tmp_path / "counters.json"
    c = Counters()
    c.consumers = ConsumerTable(Pids())
    c.add_read(5, 5, pid=2)
    CounterSaver(c, path, 5).save()
    data = json.loads(path.read_text())
    data["consumers"]["tracked"][0][4] = -3
    path.write_text(json.dumps(data))
    again = Counters()
    again.consumers = ConsumerTable(Pids())
    CounterSaver(again, path, 5).load()
    assert (again.served_from_cache, again.served_from_source) == (5, 5)
    assert again.consumers.snapshot() == []


def test_a_pods_name_is_learnt_while_it_reads_not_only_when_stats_are_asked(tmp_path):
    """A short job can be unpublished (its record removed) before the first stats poll after
    its reads: the name must have been read while the pod was reading."""
    (tmp_path / "a.json").write_text(json.dumps({"uid": "uid-2", "namespace": "ml", "name": "loader-0"}))
    table = ConsumerTable(Pids(), PodNames(tmp_path))
    table.add(2, 100, 0)
    (tmp_path / "a.json").unlink()  # the pod finished and was unpublished
    assert [(c.namespace, c.pod) for c in table.snapshot()] == [("ml", "loader-0")]
