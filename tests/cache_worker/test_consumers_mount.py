"""Per-pod attribution through a real FUSE mount: two reader processes, each moved into a cgroup
named as kubelet names pod cgroups (one per driver), read different files; ``/stats`` and
``/metrics`` give each pod its own bytes, by the names the CSI plugin's records give them."""

from __future__ import annotations

import contextlib
import os
import urllib.request
import uuid

import pytest

from datahoard import names, runtime
from datahoard.pod_records import PodRecord
from datahoard.pod_records import forget as forget_pod
from datahoard.pod_records import write as record_pod
from tests.support.cgroups import pod_cgroups, read_in, reading_in
from tests.support.mounts import datahoard, unmount
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

UID_A = str(uuid.uuid4())
UID_B = str(uuid.uuid4())


@pytest.fixture
def cgroups():
    with pod_cgroups(UID_A, UID_B) as both:
        yield both


def test_two_pods_reading_through_fuse_get_their_own_bytes(s3, bucket, mount_dataset, tmp_path, cgroups):
    cg_a, cg_b = cgroups
    a, b = os.urandom(300_000), os.urandom(700_000)
    s3.put_object(Bucket=bucket, Key="ds/a.bin", Body=a)
    s3.put_object(Bucket=bucket, Key="ds/b.bin", Body=b)
    directory = names.consumers_dir("ml", "imagenet", tmp_path / "host")
    # What the CSI plugin writes at NodePublishVolume for each pod (datahoard/pod_records.py).
    record_pod(directory, "/pods/a/mount", PodRecord(UID_A, "team-a", "trainer-0"))
    record_pod(directory, "/pods/b/mount", PodRecord(UID_B, "team-b", "eval-0"))
    m = mount_dataset(bucket, "ds", "--consumers-dir", str(directory))

    assert read_in(cg_a, m.mountpoint / "a.bin") == a  # a miss: from the source
    assert read_in(cg_a, m.mountpoint / "a.bin") == a  # a hit
    assert read_in(cg_b, m.mountpoint / "b.bin") == b  # a miss
    # Everything is cached now, so the view hands opens to the kernel; an open racing that
    # switch may be counted twice (fs.serve_opens_in_kernel): let it happen first.
    eventually(lambda: m.stats().kernel_opens, what="the view handing opens to the kernel")
    assert (m.mountpoint / "b.bin").read_bytes() == b  # the host (this process), a hit

    stats = m.stats()
    got = {(c.namespace, c.pod): (c.served_from_cache_bytes, c.served_from_source_bytes) for c in stats.consumers}
    assert got == {
        ("team-a", "trainer-0"): (len(a), len(a)),
        ("team-b", "eval-0"): (0, len(b)),
        ("", "host"): (len(b), 0),
    }
    assert sum(sum(v) for v in got.values()) == stats.served_bytes
    shown = datahoard("status", str(m.mountpoint)).stdout
    readers = next(line for line in shown.splitlines() if line.startswith("readers"))
    assert "team-a/trainer-0" in readers and "(hit 0.500)" in readers and "team-b/eval-0" in readers

    record = runtime.lookup(m.mountpoint)
    metrics = urllib.request.urlopen(record.stats_url.rstrip("/") + "/metrics", timeout=10).read().decode()
    line = next(l for l in metrics.splitlines()
                if l.startswith("datahoard_consumer_served_bytes_total{") and 'pod="trainer-0"' in l
                and 'origin="cache"' in l)
    assert 'namespace="team-a"' in line and float(line.rsplit(" ", 1)[1]) == len(a)

    # A restart continues the counts, names included, though pod A has been unpublished since.
    forget_pod(directory, "/pods/a/mount")
    unmount(m)
    m = mount_dataset(bucket, "ds", "--consumers-dir", str(directory), cache_dir=m.cache_dir,
                      mountpoint=m.mountpoint)
    assert {(c.namespace, c.pod): (c.served_from_cache_bytes, c.served_from_source_bytes)
            for c in m.stats().consumers} == got


def test_kernel_opens_are_attributed_by_fanotifys_pid(s3, bucket, mount_dataset, tmp_path, cgroups):
    """A cached dataset of small files: the kernel opens files itself, fanotify counts each open
    whole, and names the opener's pid, so the bytes still go to the right pod."""
    cg_a, cg_b = cgroups
    files = {f"img{i}.jpg": os.urandom(10_000 + i) for i in range(6)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    directory = names.consumers_dir("ml", "imagenet", tmp_path / "host")
    record_pod(directory, "/pods/a/mount", PodRecord(UID_A, "team-a", "trainer-0"))
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--no-passthrough", "--consumers-dir", str(directory))
    eventually(lambda: m.stats().kernel_opens, what="the view handing opens to the kernel")

    first, second = list(files)[:3], list(files)[3:]
    expected = {
        ("team-a", "trainer-0"): (sum(len(files[k]) for k in first), 0),
        ("", UID_B): (sum(len(files[k]) for k in second), 0),  # no record of pod B: shown by UID
    }

    def attributed() -> dict | None:
        got = {(c.namespace, c.pod): (c.served_from_cache_bytes, c.served_from_source_bytes)
               for c in m.stats().consumers}
        return got if got == expected else None

    with contextlib.ExitStack() as readers:  # alive until their opens are counted, as a trainer is
        for cgroup, keys in ((cg_a, first), (cg_b, second)):
            for key in keys:
                assert readers.enter_context(reading_in(cgroup, m.mountpoint / key)) == files[key]
        assert m.stats().kernel_opens
        eventually(attributed, what=f"fanotify's opens attributed as {expected}")
