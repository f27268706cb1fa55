"""What a mount exposes: no credentials in stats, metrics or logs; nothing outside the prefix."""

from __future__ import annotations

import os
import urllib.request

import pytest

from datahoard import runtime
from tests.support.mounts import datahoard, force_unmount

pytestmark = pytest.mark.integration

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAEXAMPLEKEYID0001"


def test_credentials_never_leak_into_stats_metrics_or_debug_logs(s3_server, s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="ds/f.bin", Body=b"x" * 1000)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    try:
        datahoard("-vv", "mount", f"s3://{bucket}/ds", str(mnt), "--cache-dir", str(cache),
                  "--endpoint-url", s3_server.endpoint, env=env)
        assert (mnt / "f.bin").read_bytes() == b"x" * 1000
        record = runtime.lookup(mnt)
        exposed = "".join(
            urllib.request.urlopen(record.stats_url + path).read().decode() for path in ("/stats", "/metrics")
        )
        exposed += datahoard("status", str(mnt), "--json").stdout
        assert SECRET not in exposed and KEY_ID not in exposed
    finally:
        datahoard("umount", str(mnt), check=False)
        force_unmount(mnt)
    log = (cache / "worker.log").read_text()
    assert "DEBUG" in log  # the log really is at debug level
    assert SECRET not in log


def test_the_view_is_read_only_even_for_root(s3, bucket, mount_dataset):
    s3.put_object(Bucket=bucket, Key="ds/f.bin", Body=b"data")
    m = mount_dataset(bucket, "ds")
    st = os.statvfs(m.mountpoint)
    assert st.f_flag & os.ST_RDONLY
    assert not os.access(m.mountpoint / "f.bin", os.W_OK)
