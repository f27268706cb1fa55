"""A running mount takes a new listing in place (``datahoard refresh``; cache_worker/refresh.py):
what readers see, on a real FUSE mount over a real S3 server."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess

import pytest

from datahoard import runtime
from tests.support.mounts import datahoard
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

MANY = 400  # more entries than one READDIR answer holds, so a listing spans several requests


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


# With --passthrough the worker's native part answers LOOKUPs it has seen (fusell/fastopen.c):
# a refresh must make it forget them, or a changed or removed name would keep its old answer.
@pytest.mark.parametrize("options", [(), ("--passthrough",)], ids=["page-cache", "passthrough"])
def test_refresh_shows_new_files_keeps_unchanged_ones_and_never_mixes_a_listing(s3, bucket, mount_dataset, options):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for i in range(MANY):
        s3.put_object(Bucket=bucket, Key=f"ds/many/f{i:04}.bin", Body=b"%d" % i)
    s3.put_object(Bucket=bucket, Key="ds/kept.bin", Body=b"kept")
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"old version")
    s3.put_object(Bucket=bucket, Key="ds/gone.bin", Body=b"removed soon")
    m = mount_dataset(bucket, "ds", *options)
    first = m.stats().snapshot
    os.stat(m.mountpoint / "gone.bin")
    kept_ino = os.stat(m.mountpoint / "kept.bin").st_ino
    assert open(m.mountpoint / "kept.bin", "rb").read() == b"kept"
    swapped_before = open(m.mountpoint / "swapped.bin", "rb")  # opened before; read after
    many_before = names(m.mountpoint / "many")

    # A listing that has started (its first entries read) before the refresh.
    listing = os.scandir(m.mountpoint / "many")
    started = [next(listing).name for _ in range(5)]

    s3.put_object(Bucket=bucket, Key="ds/new/added.bin", Body=b"added later")
    s3.put_object(Bucket=bucket, Key="ds/many/zz-late.bin", Body=b"late")
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"new version, longer")
    s3.delete_object(Bucket=bucket, Key="ds/gone.bin")
    out = datahoard("refresh", str(m.mountpoint)).stdout
    assert "2 files added" in out and "1 changed" in out and "1 removed" in out

    # The listing that started before finishes with the old snapshot: never a mix.
    finished = started + [e.name for e in listing]
    listing.close()
    assert sorted(finished) == many_before and "zz-late.bin" not in finished
    # A listing started after shows the new one.
    assert names(m.mountpoint / "many") == sorted(many_before + ["zz-late.bin"])
    assert names(m.mountpoint) == ["kept.bin", "many", "new", "swapped.bin"]

    st = m.stats()
    assert st.snapshot != first and st.refresh.state == "done" and st.files == MANY + 4
    assert open(m.mountpoint / "new/added.bin", "rb").read() == b"added later"
    assert open(m.mountpoint / "many/zz-late.bin", "rb").read() == b"late"
    assert open(m.mountpoint / "swapped.bin", "rb").read() == b"new version, longer"
    with pytest.raises(OSError) as exc:
        os.stat(m.mountpoint / "gone.bin")
    assert exc.value.errno == errno.ENOENT
    # An unchanged file is the same inode (page cache, open descriptors, passthrough untouched);
    # a descriptor opened before the refresh reads the version it opened.
    assert os.stat(m.mountpoint / "kept.bin").st_ino == kept_ino
    assert swapped_before.read() == b"old version"
    swapped_before.close()


def test_a_refresh_that_finds_nothing_new_changes_nothing(s3, bucket, mount_dataset):
    s3.put_object(Bucket=bucket, Key="ds/a.bin", Body=b"a")
    m = mount_dataset(bucket, "ds")
    first = m.stats().snapshot
    ino = os.stat(m.mountpoint / "a.bin").st_ino
    out = datahoard("refresh", str(m.mountpoint)).stdout
    assert f"snapshot {first}: 0 files added" in out
    assert m.stats().snapshot == first and os.stat(m.mountpoint / "a.bin").st_ino == ino


def test_a_refresh_to_an_empty_prefix_is_refused_and_the_old_view_stays(s3, bucket, mount_dataset):
    s3.put_object(Bucket=bucket, Key="ds/a.bin", Body=b"a")
    m = mount_dataset(bucket, "ds")
    first = m.stats().snapshot
    assert open(m.mountpoint / "a.bin", "rb").read() == b"a"
    s3.delete_object(Bucket=bucket, Key="ds/a.bin")
    result = datahoard("refresh", str(m.mountpoint), check=False)
    assert result.returncode == 1
    assert "refresh failed, the previous snapshot is still served" in result.stderr
    assert "nothing to serve: no files under" in result.stderr
    assert m.stats().snapshot == first and names(m.mountpoint) == ["a.bin"]
    assert not list(m.cache_dir.glob("index.db.*"))


def test_the_refreshed_view_survives_a_worker_restart(s3, bucket, mount_dataset):
    """The refreshed index keeps the first one's lineage: a restarted worker resumes the
    connection (node ids still mean the same files) and serves the new snapshot."""
    s3.put_object(Bucket=bucket, Key="ds/a.bin", Body=b"a")
    m = mount_dataset(bucket, "ds")
    held = open(m.mountpoint / "a.bin", "rb")
    s3.put_object(Bucket=bucket, Key="ds/b.bin", Body=b"b")
    datahoard("refresh", str(m.mountpoint))
    refreshed = m.stats().snapshot
    pid = runtime.lookup(m.mountpoint).pid
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: (r := runtime.lookup(m.mountpoint)) is not None and r.pid != pid, timeout=60,
               what="the supervisor to restart the worker")
    st = m.stats()
    assert st.snapshot == refreshed and st.fuse.resumed
    assert names(m.mountpoint) == ["a.bin", "b.bin"]
    assert held.read() == b"a" and open(m.mountpoint / "b.bin", "rb").read() == b"b"
    held.close()


def _post_refresh_from(source_ip: str, port: int) -> bytes:
    """POST /refresh over a socket bound to ``source_ip``: what the endpoint sees as the client."""
    with socket.create_connection((source_ip, port), timeout=10, source_address=(source_ip, 0)) as conn:
        conn.sendall(b"POST /refresh HTTP/1.1\r\nHost: worker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer


def test_post_refresh_from_another_address_is_refused_over_http(tmp_path):
    """The stats port is open to scrapers and peers (bound to every address in a pod): a POST
    /refresh from any address but loopback is answered 403 and starts nothing."""
    from datahoard.cache_worker.stats_server import StatsServer, _loopback

    assert _loopback(("::1", 1, 0, 0)) and _loopback(("::ffff:127.0.0.1", 1, 0, 0))
    assert not _loopback(("fe80::1", 1, 0, 0))
    other = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True,
                           text=True).stdout.split()
    addresses = [word.split("/")[0] for before, word in zip(other, other[1:]) if before == "inet"]
    if not addresses:
        pytest.skip("this machine has no IPv4 address but loopback to send the request from")
    asked: list[dict] = []
    server = StatsServer(("0.0.0.0", 0), lambda: None, lambda: True,
                         refresh=lambda query: (asked.append(query), (202, "refresh started"))[1])
    server.start()
    try:
        port = server.server_address[1]
        refused = _post_refresh_from(addresses[0], port)
        assert refused.split(b"\r\n")[0].endswith(b" 403 Forbidden") and b"a refresh is asked from this machine only" in refused
        assert asked == []
        accepted = _post_refresh_from("127.0.0.1", port)
        assert accepted.split(b"\r\n")[0].endswith(b" 202 Accepted") and asked == [{}]
    finally:
        server.stop()


def test_refresh_is_not_asked_of_a_direct_tree(s3, bucket, mount_dataset):
    s3.put_object(Bucket=bucket, Key="ds/a.bin", Body=b"a")
    m = mount_dataset(bucket, "ds", "--direct")
    result = datahoard("refresh", str(m.mountpoint), check=False)
    assert result.returncode == 1 and "serves the direct tree (--direct)" in result.stderr
