"""A refresh on Kubernetes is a worker restart onto a new snapshot (operator/refresh.py): the
worker the operator names lists the source once per request token, keeps the node ids of what
did not change, resumes the FUSE connection the CSI plugin's keeper holds, and drops the
changed names from the kernel's cache. Here the worker runs as its pod does, and its env is
changed between two starts as the kubelet would change it from the ConfigMap."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from datahoard import names
from tests.support.csi import PodWorker

pytestmark = pytest.mark.integration

MANY = 400  # more entries than one READDIR answer holds
CONTEXT = {names.CTX_NAMESPACE: "ml", names.CTX_NAME: "imagenet"}


def stats(worker: PodWorker) -> dict:
    out = subprocess.run([sys.executable, "-m", "datahoard.cli", "status", "--json", str(worker.view)],
                         env=worker.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_restart_for_the_operators_refresh_moves_readers_to_the_new_snapshot(
        keeper_plugin, node, s3, bucket, s3_server, tmp_path):
    for key, body in {"a/1.bin": b"one", "gone.bin": b"removed soon", "swapped.bin": b"old bytes"}.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    for i in range(MANY):
        s3.put_object(Bucket=bucket, Key=f"ds/many/f{i:04}", Body=b"x")
    worker = PodWorker(node, f"s3://{bucket}/ds/", node.view_path(), node.root / "cache", s3_server.endpoint,
                       log_dir=tmp_path, keeper_socket=keeper_plugin.keeper_socket)
    worker.start()
    try:
        target = node.target()
        keeper_plugin.client.publish(target, context=CONTEXT)
        first = stats(worker)["snapshot"]
        one_ino = os.stat(f"{target}/a/1.bin").st_ino
        assert open(f"{target}/swapped.bin", "rb").read() == b"old bytes"  # its dentry is cached now
        held = os.open(f"{target}/gone.bin", os.O_RDONLY)
        assert os.read(held, 100) == b"removed soon"
        many_before = sorted(os.listdir(f"{target}/many"))
        listing = os.scandir(f"{target}/many")  # a listing under way across the restart
        started = [next(listing).name for _ in range(5)]

        s3.put_object(Bucket=bucket, Key="ds/a/2.bin", Body=b"two")
        s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"new bytes, longer")
        s3.delete_object(Bucket=bucket, Key="ds/gone.bin")
        s3.delete_object(Bucket=bucket, Key="ds/many/f0002")
        s3.put_object(Bucket=bucket, Key="ds/many/late", Body=b"late")
        worker.env.update({"NODE_NAME": "gpu-a", "DATAHOARD_REFRESH_LISTER": "gpu-a",
                           "DATAHOARD_REFRESH_TOKEN": "request-1"})
        worker.stop()  # the operator deletes the lister's pod; the DaemonSet starts it again
        worker.start()

        st = stats(worker)
        assert st["fuse"]["resumed"], st["fuse"]
        refresh = st["refresh"]
        assert (refresh["state"], refresh["token"]) == ("done", "request-1")
        assert refresh["snapshot"] == st["snapshot"] != first
        assert (refresh["added_files"], refresh["changed_files"], refresh["removed_files"]) == (2, 1, 2)
        # The listing under way finishes with the snapshot it began with; a new one shows the new.
        finished = started + [e.name for e in listing]
        listing.close()
        assert sorted(finished) == many_before
        assert sorted(os.listdir(f"{target}/many")) == sorted(set(many_before) - {"f0002"} | {"late"})
        assert sorted(os.listdir(f"{target}/a")) == ["1.bin", "2.bin"]
        assert os.stat(f"{target}/a/1.bin").st_ino == one_ino
        # The kernel had swapped.bin's old dentry: it was dropped, so an open finds the new object.
        assert open(f"{target}/swapped.bin", "rb").read() == b"new bytes, longer"
        with pytest.raises(OSError) as exc:
            os.stat(f"{target}/gone.bin")
        assert exc.value.errno == errno.ENOENT
        # A descriptor opened before still reads its file, even with the page cache dropped.
        os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(held, 100, 0) == b"removed soon"
        os.close(held)

        # The same request again (a restart before the operator moved on) is not listed again:
        # the answer is remembered and still reported.
        s3.put_object(Bucket=bucket, Key="ds/a/3.bin", Body=b"three")
        worker.stop()
        worker.start()
        again = stats(worker)
        assert again["refresh"] == refresh and again["snapshot"] == refresh["snapshot"]
        assert sorted(os.listdir(f"{target}/a")) == ["1.bin", "2.bin"]
        keeper_plugin.client.unpublish(target)
    finally:
        worker.cleanup()
