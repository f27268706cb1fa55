"""Two real mounts of one bucket, the second from the first's snapshot (no Kubernetes): they see
the same file set although the bucket changed between them, and a peer that serves another
listing under the id is refused with nothing cached from it."""

from __future__ import annotations

import errno
import os

import pytest

from datahoard import runtime
from datahoard.cache_worker import snapshot
from tests.support.mounts import datahoard

pytestmark = pytest.mark.integration


def tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_second_mount_serves_the_first_ones_snapshot(s3, bucket, mount_dataset, tmp_path):
    for key in ("a/1.bin", "a/2.bin", "b.bin"):
        s3.put_object(Bucket=bucket, Key=f"ds/{key}", Body=key.encode() * 100)
    first = mount_dataset(bucket, "ds")
    st = first.stats()
    assert st.snapshot and len(st.snapshot) == 64
    assert (first.cache_dir / snapshot.file_name(st.snapshot)).exists()
    assert f"snapshot     {st.snapshot}" in datahoard("status", str(first.mountpoint)).stdout

    s3.put_object(Bucket=bucket, Key="ds/a/late.bin", Body=b"added after the first listing")
    peer = runtime.lookup(first.mountpoint).stats_url
    second = mount_dataset(bucket, "ds", "--snapshot-id", st.snapshot, "--snapshot-from", peer)
    assert second.stats().snapshot == st.snapshot
    assert tree(second.mountpoint) == tree(first.mountpoint) == ["a/1.bin", "a/2.bin", "b.bin"]
    assert open(second.mountpoint / "a/2.bin", "rb").read() == b"a/2.bin" * 100
    # A mount that lists afresh sees the new object: another snapshot, another id.
    third = mount_dataset(bucket, "ds")
    assert "a/late.bin" in tree(third.mountpoint) and third.stats().snapshot != st.snapshot


def test_a_tampered_snapshot_is_refused_and_nothing_is_cached(s3, bucket, mount_dataset, tmp_path):
    s3.put_object(Bucket=bucket, Key="ds/x.bin", Body=b"x")
    first = mount_dataset(bucket, "ds")
    sid = first.stats().snapshot
    peer = runtime.lookup(first.mountpoint).stats_url
    # The peer's file now holds another listing of the same source under the same name.
    listed = sorted(first.cache_dir.glob("snapshot-*.jsonl.gz"))
    assert [p.name for p in listed] == [snapshot.file_name(sid)]
    from datahoard.cache_worker.source import RemoteObject

    _, evil, _ = snapshot.write([RemoteObject("x.bin", 1, "forged", 0.0), RemoteObject("y.bin", 1, "e", 0.0)],
                                first.source, tmp_path / "evil")
    evil.replace(listed[0])
    cache = tmp_path / "joiner-cache"
    result = datahoard("mount", first.source, str(tmp_path / "joiner"), "--cache-dir", str(cache),
                       "--endpoint-url", first.endpoint, "--snapshot-id", sid, "--snapshot-from", peer, check=False)
    assert result.returncode == 1
    assert f"cannot get snapshot {sid} from any peer: {peer}/snapshot/{sid}: refused, it hashes to" in result.stderr
    assert not os.path.ismount(tmp_path / "joiner")
    assert not list(cache.glob("snapshot*")) and not (cache / "index.db").exists()


def test_a_mount_from_a_snapshot_reads_objects_as_listed_or_not_at_all(s3, bucket, mount_dataset):
    """Today's pinning holds for a snapshot that came from a peer: reads are conditional on the
    snapshot's ETag, so an object replaced after the listing is EIO, never the new bytes."""
    s3.put_object(Bucket=bucket, Key="ds/kept.bin", Body=b"listed")
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"listed version")
    first = mount_dataset(bucket, "ds")
    sid = first.stats().snapshot
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"replaced after the snapshot")
    second = mount_dataset(bucket, "ds", "--snapshot-id", sid, "--snapshot-from",
                           runtime.lookup(first.mountpoint).stats_url)
    assert open(second.mountpoint / "kept.bin", "rb").read() == b"listed"
    assert os.stat(second.mountpoint / "swapped.bin").st_size == len(b"listed version")
    with pytest.raises(OSError) as exc:
        open(second.mountpoint / "swapped.bin", "rb").read()
    assert exc.value.errno == errno.EIO


@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_a_versioned_bucket_is_read_by_version_so_a_replaced_object_still_reads_as_listed(
        s3, bucket, mount_dataset, client):
    env = {"DATAHOARD_S3_CLIENT": client}
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"listed version")
    s3.put_object(Bucket=bucket, Key="ds/gone.bin", Body=b"deleted before the listing")
    s3.delete_object(Bucket=bucket, Key="ds/gone.bin")  # a delete marker: not in the view
    first = mount_dataset(bucket, "ds", env=env)
    assert os.listdir(first.mountpoint) == ["swapped.bin"]
    sid = first.stats().snapshot
    import gzip

    text = gzip.decompress((first.cache_dir / snapshot.file_name(sid)).read_bytes()).decode()
    listed = s3.list_object_versions(Bucket=bucket, Prefix="ds/swapped.bin")["Versions"][0]["VersionId"]
    assert f'"{listed}"' in text  # the snapshot pins the versionId
    s3.put_object(Bucket=bucket, Key="ds/swapped.bin", Body=b"replaced after the snapshot")
    assert open(first.mountpoint / "swapped.bin", "rb").read() == b"listed version"
    second = mount_dataset(bucket, "ds", "--snapshot-id", sid, "--snapshot-from",
                           runtime.lookup(first.mountpoint).stats_url, env=env)
    assert open(second.mountpoint / "swapped.bin", "rb").read() == b"listed version"
    assert second.stats().errors == 0
