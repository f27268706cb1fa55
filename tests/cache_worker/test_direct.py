"""``--direct``: a fully cached dataset served as a read-only tree of hard links, bind-mounted
over the mountpoint, with real mounts and real bytes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import stat
import time
import urllib.request
from pathlib import Path

import pytest

from datahoard.mounts import bind_readonly, unmount_all
from tests.support.mounts import datahoard, mounts_at
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

MiB = 1 << 20


def anything_mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def upload(s3, bucket: str, files: dict[str, bytes], prefix: str = "ds/") -> None:
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def dataset() -> dict[str, bytes]:
    files = {f"train/c{i % 3}/img{i:03d}.jpg": os.urandom(20_000 + 997 * i) for i in range(24)}
    files["empty.txt"] = b""
    files["labels.txt"] = b"cat\ndog\n"
    files["shard.tar"] = os.urandom(19 * MiB + 12345)  # three chunks, in one cache file
    return files


def wait_direct(m, state: str = "ready"):
    return eventually(lambda: (s := m.stats()).direct.state in (state, "failed") and s, what=f"direct {state}")


def read_all(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def test_warm_direct_serves_a_bind_of_the_tree_with_every_byte_right(s3, bucket, mount_dataset):
    files = dataset()
    upload(s3, bucket, files)
    s3.put_object(Bucket=bucket, Key="ds/empty-dir/", Body=b"")  # a directory marker
    m = mount_dataset(bucket, "ds", "--warm", "--direct", "--parallelism", "4")
    stats = wait_direct(m)
    assert stats.direct.state == "ready", stats.direct
    assert stats.serving == "direct"
    tree = Path(stats.direct.path)
    assert tree.parent == m.cache_dir / "direct"
    assert stats.direct.files == len(files) and stats.direct.bytes == sum(map(len, files.values()))
    assert stats.direct.assembled_bytes == 0  # nothing copied: large files are links too

    # The mountpoint is now a read-only bind of the tree, stacked on the FUSE view.
    layers = mounts_at(m.mountpoint)
    assert [fstype for fstype, _ in layers][0] == "fuse.datahoard"
    assert not layers[-1][0].startswith("fuse") and layers[-1][1].endswith(f"/direct/{tree.name}")
    assert os.stat(m.mountpoint).st_dev == os.stat(tree).st_dev

    assert read_all(m.mountpoint) == files
    assert (m.mountpoint / "empty-dir").is_dir() and not os.listdir(m.mountpoint / "empty-dir")
    # Files are the cache files themselves (hard links), verified before they were linked.
    small = os.stat(m.mountpoint / "labels.txt")
    assert small.st_nlink == 2 and stat.S_IMODE(small.st_mode) == 0o444
    assert os.stat(m.mountpoint / "shard.tar").st_nlink == 2
    assert stat.S_IMODE(os.stat(m.mountpoint / "train").st_mode) == 0o555
    # mtimes are what the FUSE view showed: the object's for files.
    head = s3.head_object(Bucket=bucket, Key="ds/labels.txt")
    assert abs(small.st_mtime - head["LastModified"].timestamp()) < 1

    for attempt in (lambda: open(m.mountpoint / "labels.txt", "ab"),
                    lambda: open(m.mountpoint / "new.txt", "wb"),
                    lambda: os.mkdir(m.mountpoint / "d"),
                    lambda: os.unlink(m.mountpoint / "labels.txt")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in (errno.EROFS, errno.EACCES)

    from datahoard import runtime

    metrics = urllib.request.urlopen(runtime.lookup(m.mountpoint).stats_url + "/metrics").read().decode()
    assert any(line.startswith("datahoard_serving_direct{") and line.endswith(" 1.0") for line in metrics.splitlines())
    status = datahoard("status", str(m.mountpoint)).stdout
    assert "serving" in status and "direct" in status and "hit ratio" in status

    datahoard("umount", str(m.mountpoint))
    assert mounts_at(m.mountpoint) == []
    assert not anything_mounted_under(m.mountpoint)
    assert tree.is_dir()  # the tree stays for the next mount


def test_opens_of_the_tree_count_in_the_hit_ratio_through_every_bind(s3, bucket, mount_dataset, tmp_path):
    """Reads of the tree never reach the worker; fanotify counts each open of one of its files
    as a hit of the file's size (as kernel opens count), through the mountpoint's bind and a
    bind of the tree elsewhere (what the CSI plugin makes for a pod) alike."""
    files = dataset()
    upload(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--direct", "--parallelism", "4")
    stats = wait_direct(m)
    assert stats.serving == "direct", stats.direct
    assert stats.direct.opens_counted == "fanotify by file id, in C"
    before = stats.served_from_cache_bytes

    assert read_all(m.mountpoint) == files
    assert m.stats().served_from_cache_bytes - before == sum(map(len, files.values()))

    pod_view = tmp_path / "pod-view"
    pod_view.mkdir()
    bind_readonly(stats.direct.path, pod_view, [])
    try:
        with open(pod_view / "labels.txt", "rb") as f:  # an open counts the whole file
            assert f.read(3) == b"cat"
        after = m.stats()
    finally:
        unmount_all(pod_view)
    assert after.served_from_cache_bytes - before == sum(map(len, files.values())) + len(files["labels.txt"])
    assert after.served_from_source_bytes == stats.served_from_source_bytes
    assert "opens counted: fanotify by file id" in datahoard("status", str(m.mountpoint)).stdout
    datahoard("umount", str(m.mountpoint))


def test_open_descriptors_on_fuse_keep_working_after_the_switch(s3, bucket, mount_dataset):
    files = {f"f{i:02d}.bin": os.urandom(300_000) for i in range(16)}
    upload(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--direct", "--warm", "--parallelism", "2", "--bandwidth-limit", "1M")
    with open(m.mountpoint / "f00.bin", "rb") as held:  # opened on the FUSE view
        assert wait_direct(m).serving == "direct"
        assert held.read() == files["f00.bin"]
    assert (m.mountpoint / "f15.bin").read_bytes() == files["f15.bin"]
    datahoard("umount", str(m.mountpoint))
    assert mounts_at(m.mountpoint) == []


def test_without_direct_nothing_changes(s3, bucket, mount_dataset):
    files = {"a.bin": os.urandom(10_000)}
    upload(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--wait")
    time.sleep(0.5)
    stats = m.stats()
    assert stats.serving == "fuse" and stats.direct.state == "off"
    assert [fstype for fstype, _ in mounts_at(m.mountpoint)] == ["fuse.datahoard"]
    assert not (m.cache_dir / "direct").exists()
    assert (m.mountpoint / "a.bin").read_bytes() == files["a.bin"]
    assert "serving" not in datahoard("status", str(m.mountpoint)).stdout


def test_a_corrupt_chunk_is_refetched_before_it_is_linked(s3, bucket, mount_dataset, tmp_path):
    files = {f"f{i}.bin": os.urandom(50_000) for i in range(6)}
    upload(s3, bucket, files)
    cache = tmp_path / "cache"
    m = mount_dataset(bucket, "ds", "--warm", "--wait", cache_dir=cache)
    fetched = m.stats().fetched_bytes  # the counters continue after a restart (counters.json)
    datahoard("umount", str(m.mountpoint))
    chunk_files = sorted(p for p in (cache / "chunks" / "data").rglob("*") if p.is_file())
    assert len(chunk_files) == len(files)
    for path in chunk_files[:2]:  # rot behind the worker's back
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    m2 = mount_dataset(bucket, "ds", "--direct", cache_dir=cache)
    stats = wait_direct(m2)
    assert stats.direct.state == "ready", stats.direct
    assert stats.fetched_bytes - fetched == 2 * 50_000  # exactly the two corrupt chunks came again
    assert read_all(Path(stats.direct.path)) == files
    assert read_all(m2.mountpoint) == files
    datahoard("umount", str(m2.mountpoint))
    assert mounts_at(m2.mountpoint) == []


def test_large_files_are_linked_not_copied_so_a_tree_fits_any_cache_that_holds_the_dataset(
        s3, bucket, mount_dataset):
    """Before one file per object, large files were copied into the tree and needed as much
    room again; now a cache that holds the dataset holds its tree."""
    files = {"small.bin": os.urandom(100_000), "big.bin": os.urandom(17 * MiB)}
    upload(s3, bucket, files)
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--direct", "--capacity", "18Mi")
    stats = m.stats()  # --wait with --direct waits for the tree's outcome too
    assert stats.direct.state == "ready" and stats.serving == "direct", stats.direct
    assert os.stat(Path(stats.direct.path) / "big.bin").st_nlink == 2
    assert read_all(m.mountpoint) == files


def test_restart_reuses_the_tree_and_a_crash_leaves_nothing_mounted(s3, bucket, mount_dataset, tmp_path):
    files = dataset()
    upload(s3, bucket, files)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    # --max-restarts 0: the crash below must stay a crash (no supervisor restart).
    m = mount_dataset(bucket, "ds", "--warm", "--direct", "--max-restarts", "0", cache_dir=cache, mountpoint=mnt)
    first = wait_direct(m)
    tree = Path(first.direct.path)
    inode = os.stat(tree / "labels.txt").st_ino
    fetched = first.fetched_bytes

    # A crash: SIGKILL leaves the bind over a dead FUSE view, and a half-built tree.
    from datahoard import runtime

    pid = runtime.lookup(mnt).pid
    half = cache / "direct" / f".building-{tree.name}-999999"
    half.mkdir()
    (half / "junk").write_bytes(b"x")
    # The counters continue after a restart from their last save: wait for the one with the
    # warming's bytes, so that "nothing fetched since" is exact.
    saved = cache / "counters.json"
    eventually(lambda: saved.exists() and json.loads(saved.read_text())["counters"]["fetched"] == fetched,
             timeout=30,
             what="the counters to be saved")
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not runtime.alive(pid), what="the worker to die")

    m2 = mount_dataset(bucket, "ds", "--direct", cache_dir=cache, mountpoint=mnt)
    stats = wait_direct(m2)
    assert stats.direct.state == "ready" and stats.direct.path == str(tree)
    assert os.stat(tree / "labels.txt").st_ino == inode  # the same tree, not a rebuild
    assert stats.fetched_bytes == fetched == sum(map(len, files.values()))  # nothing fetched since
    assert not half.exists()
    assert read_all(mnt) == files
    datahoard("umount", str(mnt))
    assert mounts_at(mnt) == []


def test_a_refresh_keeps_the_old_tree_while_something_binds_it(s3, bucket, mount_dataset, tmp_path):
    upload(s3, bucket, {"a.bin": b"one" * 1000})
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    m = mount_dataset(bucket, "ds", "--warm", "--direct", cache_dir=cache, mountpoint=mnt)
    old = Path(wait_direct(m).direct.path)
    pod = tmp_path / "pod"  # stands for a pod that was published the old tree
    pod.mkdir()
    bind_readonly(old, pod, [])
    try:
        datahoard("umount", str(mnt))
        upload(s3, bucket, {"b.bin": b"two" * 1000})
        m2 = mount_dataset(bucket, "ds", "--warm", "--direct", "--refresh", cache_dir=cache, mountpoint=mnt)
        new = Path(wait_direct(m2).direct.path)
        assert new != old and old.is_dir()  # still bound by the 'pod'
        assert sorted(os.listdir(mnt)) == ["a.bin", "b.bin"]
        assert (pod / "a.bin").read_bytes() == b"one" * 1000
        datahoard("umount", str(mnt))
    finally:
        unmount_all(pod)
    m3 = mount_dataset(bucket, "ds", "--direct", cache_dir=cache, mountpoint=mnt)
    assert wait_direct(m3).direct.path == str(new)
    eventually(lambda: not old.exists(), what="the unused old tree to be removed")


def test_fusermount_on_the_mountpoint_unmounts_both_layers(s3, bucket, mount_dataset):
    """Tools that know only FUSE (``fusermount3 -u``) take the top layer, the tree's bind; the
    worker takes that as the unmount it is and unmounts its FUSE view too."""
    upload(s3, bucket, {"a.bin": b"a" * 5000})
    m = mount_dataset(bucket, "ds", "--warm", "--direct")
    wait_direct(m)
    from datahoard import runtime

    pid = runtime.lookup(m.mountpoint).pid
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
    eventually(lambda: not runtime.alive(pid), what="the worker to exit")
    assert mounts_at(m.mountpoint) == []


def test_a_tree_entry_whose_chunk_rotted_is_relinked_to_right_bytes_on_reuse(s3, bucket, mount_dataset, tmp_path):
    files = dataset()
    upload(s3, bucket, files)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    m = mount_dataset(bucket, "ds", "--warm", "--direct", cache_dir=cache, mountpoint=mnt)
    first = wait_direct(m)
    tree = Path(first.direct.path)
    datahoard("umount", str(mnt))
    victim = tree / "train" / "c1" / "img001.jpg"
    data = bytearray(victim.read_bytes())  # the tree entry *is* the chunk file (a hard link)
    data[7] ^= 0x55
    with open(victim, "r+b") as f:
        f.write(bytes(data))
    shard = tree / "shard.tar"  # also the cache file itself, damaged in its last chunk
    with open(shard, "r+b") as f:
        f.seek(18 * MiB)
        f.write(b"\0" * 16)

    m2 = mount_dataset(bucket, "ds", "--direct", cache_dir=cache, mountpoint=mnt)
    stats = wait_direct(m2)
    assert stats.direct.state == "ready" and stats.direct.path == str(tree)
    # Relinked by rename to the refetched chunk (the inode number itself may be reused).
    assert victim.read_bytes() == files["train/c1/img001.jpg"] and os.stat(victim).st_nlink == 2
    assert os.stat(shard).st_nlink == 2
    # A complete cache file is never rewritten in place (it may be a passthrough backing file):
    # the damaged shard came again whole (the counters continue the first mount's).
    assert stats.fetched_bytes - first.fetched_bytes == len(files["train/c1/img001.jpg"]) + len(files["shard.tar"])
    assert read_all(mnt) == files
    datahoard("umount", str(mnt))
    assert mounts_at(mnt) == []


def test_a_tree_built_with_copies_of_large_files_is_relinked_and_its_space_given_back(
        s3, bucket, mount_dataset, tmp_path):
    """Trees from before one file per object held copies of large files, counted in their
    manifest (``assembled_bytes``) against the capacity: reused, they become links and the
    count goes back to 0."""
    import json
    import shutil

    files = {"a.bin": os.urandom(10_000), "shard.tar": os.urandom(17 * MiB)}
    upload(s3, bucket, files)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    m = mount_dataset(bucket, "ds", "--warm", "--direct", cache_dir=cache, mountpoint=mnt)
    first = wait_direct(m)
    tree = Path(first.direct.path)
    datahoard("umount", str(mnt))
    shard = tree / "shard.tar"  # as the older layout built it: a copy, counted in the manifest
    copy = tmp_path / "copy"
    shutil.copyfile(shard, copy)
    os.replace(copy, shard)
    assert os.stat(shard).st_nlink == 1
    manifest = cache / "direct" / f"{tree.name}.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "assembled_bytes": len(files["shard.tar"])}))

    m2 = mount_dataset(bucket, "ds", "--direct", cache_dir=cache, mountpoint=mnt)
    stats = wait_direct(m2)
    assert stats.direct.state == "ready" and stats.direct.path == str(tree)
    assert os.stat(shard).st_nlink == 2
    assert stats.fetched_bytes == first.fetched_bytes  # nothing fetched again (the counters continue)
    assert json.loads(manifest.read_text())["assembled_bytes"] == 0
    assert read_all(mnt) == files
    datahoard("umount", str(mnt))


def test_the_tree_thread_is_woken_by_a_mount_change_only_while_it_watches_the_mount_tables(tmp_path):
    """What replaced the direct thread's 0.2 s tick for its bind (wakeup.py): the kernel marks
    the mount table POLLPRI on a mount or unmount, and the waiting thread returns at once."""
    from datahoard.cache_worker.wakeup import Wakeup

    wakeup = Wakeup()
    target = tmp_path / "m"
    target.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
        assert not wakeup.wait(0)  # not watching: no mount wakes it
        wakeup.watch_mounts(True)
        subprocess.run(["umount", str(target)], check=True)
        assert wakeup.wait(60)  # the unmount, not the time limit
        wakeup.watch_mounts(False)
        wakeup.wake()
        assert wakeup.wait(60) and wakeup.count == 3
    finally:
        unmount_all(target)
        wakeup.close()
