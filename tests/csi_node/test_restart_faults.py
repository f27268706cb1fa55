"""What can go wrong around a held FUSE connection (issue 17), each with a clear outcome:

* a second worker for a mountpoint another worker serves is refused, and the first goes on;
* the keeper dies while a worker serves: nothing changes for readers until the worker dies too;
  then the mount fails cleanly (ENOTCONN, never a hang) and the next worker mounts afresh;
* without passthrough (``--no-passthrough``, or a kernel that lacks it) reads still work, through
  the worker, and ``datahoard status`` says why there is no passthrough.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.support.csi import PodWorker
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

FILES = {f"train/img{i:03d}.jpg": os.urandom(20_000 + i) for i in range(20)}


def _dataset(s3, bucket) -> str:
    for key, body in FILES.items():
        s3.put_object(Bucket=bucket, Key="imagenet/" + key, Body=body)
    return f"s3://{bucket}/imagenet/"


@pytest.fixture
def worker(keeper_plugin, node, s3, bucket, s3_server, tmp_path):
    """The dataset's worker as its pod runs it, with the plugin's keeper; not started yet."""
    w = PodWorker(node, _dataset(s3, bucket), node.view_path(), node.root / "cache", s3_server.endpoint,
                  log_dir=tmp_path, keeper_socket=keeper_plugin.keeper_socket)
    yield w
    w.cleanup()


def _status(worker: PodWorker) -> dict:
    out = subprocess.run([sys.executable, "-m", "datahoard.cli", "status", "--json", str(worker.view)],
                         env=worker.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _read_all(view) -> None:
    for key, body in FILES.items():
        assert (view / key).read_bytes() == body, key


def test_a_second_worker_for_a_served_mountpoint_is_refused(worker, node, s3_server):
    worker.start()
    second = subprocess.run(
        [sys.executable, "-m", "datahoard.cli", "mount", worker.source, str(worker.view), "--cache-dir",
         str(node.root / "cache2"), "--endpoint-url", s3_server.endpoint, "--foreground"],
        env=worker.env, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert "already served by datahoard" in second.stderr, second.stderr
    _read_all(worker.view)
    assert worker.proc.poll() is None


def test_when_the_keeper_dies_the_mount_fails_cleanly_and_the_next_worker_remounts(worker, keeper_plugin):
    # Reading every file caches the dataset, and kernel opens then let the kernel answer opens
    # and page-cached reads without the connection, dead or alive (the switch used to come up
    # to a second later, from a poller, after this test had killed the worker).
    worker.extra_args = ["--no-kernel-opens"]
    worker.start()
    _read_all(worker.view)
    keeper_plugin.stop()  # the plugin (and its keeper) goes; the worker's own descriptor remains
    _read_all(worker.view)
    worker.kill()
    # Nothing holds the connection any more: the kernel aborts it, readers get an error at once.
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_errno_of_read(worker.view / "train/img000.jpg")))
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "a read of a mount nobody holds hung"
    assert outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED), outcome
    worker.start()  # no keeper now: clears the dead mount and mounts afresh
    _read_all(worker.view)
    fuse = _status(worker)["fuse"]
    assert not fuse["handover"] and "keeper" in fuse["handover_note"], fuse


def _errno_of_read(path) -> int | None:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno
    return None


def test_without_passthrough_reads_go_through_the_worker_and_status_says_so(worker):
    worker.extra_args = ["--no-passthrough", "--no-kernel-opens"]
    worker.start()
    _read_all(worker.view)
    _read_all(worker.view)  # cached now: served by the worker from the cache
    stats = _status(worker)
    assert not stats["fuse"]["passthrough"] and "--no-passthrough" in stats["fuse"]["passthrough_note"]
    assert stats["fuse"]["passthrough_opens"] == 0
    assert stats["served_from_cache_bytes"] >= sum(map(len, FILES.values()))


def test_with_passthrough_cached_files_are_read_by_the_kernel_even_with_the_worker_stopped(worker):
    worker.extra_args = ["--passthrough"]  # forced: by default only datasets with large files use it
    worker.start()
    _read_all(worker.view)  # fetched and cached whole
    handles = {key: open(worker.view / key, "rb", buffering=0) for key in FILES}  # passed through
    stats = _status(worker)
    assert stats["fuse"]["passthrough"] and stats["fuse"]["passthrough_opens"] >= len(FILES), stats["fuse"]
    os.kill(worker.proc.pid, 19)  # SIGSTOP: no answer to anything from the worker
    try:
        for key, f in handles.items():
            assert os.pread(f.fileno(), 1 << 20, 0) == FILES[key], key
    finally:
        os.kill(worker.proc.pid, 18)  # SIGCONT
    for f in handles.values():
        f.close()


def test_after_a_plugin_restart_the_worker_gives_the_connection_to_the_new_keeper(worker, keeper_plugin):
    worker.start()
    _read_all(worker.view)
    keeper_plugin.restart()  # the plugin's DaemonSet rolls: the old keeper let go of everything
    eventually(lambda: "holds the connection again" in worker.logs[-1].read_text(), timeout=30,
               what="the worker to deposit its connection with the new keeper")
    worker.kill()  # now a crash is hidden again
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_errno_of_read(worker.view / "train/img001.jpg")))
    reader.start()
    worker.start()
    reader.join(60)
    assert outcome == [None], outcome  # the read waited for the next worker instead of failing
    _read_all(worker.view)
    assert _status(worker)["fuse"]["resumed"]
