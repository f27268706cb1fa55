"""``datahoard mount`` and ``umount`` refuse what they must not do, before touching anything,
with one clear line: the real CLI, real mounts, a real S3 server (moto over HTTP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datahoard import runtime
from tests.support.mounts import datahoard, force_unmount, mounts_at
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


def one_error_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single ``datahoard...: error: ...`` line a refusal must print."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and ": error: " in lines[0], (result.returncode, result.stderr)
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs (not ours) at a fresh directory; unmounted after."""
    mounted: list[Path] = []

    def mount(path: Path, options: str = "size=1m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mount_args(bucket: str, mnt: Path, cache: Path, endpoint: str, *extra: str) -> list[str]:
    return ["mount", f"s3://{bucket}/ds", str(mnt), "--cache-dir", str(cache), "--endpoint-url", endpoint, *extra]


@pytest.fixture
def try_mount():
    """Run a ``datahoard mount`` that should be refused; whatever it mounted anyway (on code
    that does not refuse it) is unmounted after the test."""
    tried: list[Path] = []

    def attempt(*args: str) -> subprocess.CompletedProcess:
        tried.append(Path(args[2]))
        return datahoard(*args, check=False)

    yield attempt
    for mnt in tried:
        if os.path.ismount(mnt):
            datahoard("umount", str(mnt), check=False)
            force_unmount(mnt)


# -- umount --------------------------------------------------------------------------------
def test_umount_leaves_a_mount_that_is_not_ours_alone(tmp_path, tmpfs):
    mnt = tmpfs(tmp_path / "scratch")
    (mnt / "keep").write_text("mine")
    line = one_error_line(datahoard("umount", str(mnt), check=False))
    assert line == f"datahoard: error: {mnt} is not a datahoard mount (it is a tmpfs mount of tmpfs); not unmounting it"
    assert (mnt / "keep").read_text() == "mine"


def test_umount_leaves_a_mount_stacked_on_our_view_alone(s3, bucket, mount_dataset, tmpfs):
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    m = mount_dataset(bucket, "ds")
    tmpfs(m.mountpoint)
    line = one_error_line(datahoard("umount", str(m.mountpoint), check=False))
    assert "a tmpfs mount of tmpfs is stacked on the datahoard view" in line
    assert [t for t, _ in mounts_at(m.mountpoint)] == ["fuse.datahoard", "tmpfs"]
    assert runtime.lookup(m.mountpoint) is not None


def test_umount_does_not_exit_0_while_the_worker_runs(s3, bucket, mount_dataset):
    """A worker that does not exit after its view is unmounted (here: SIGSTOPped, so even
    SIGTERM waits) is an error naming it, within the timeout, never a silent success."""
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    m = mount_dataset(bucket, "ds")
    pid = runtime.lookup(m.mountpoint).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = datahoard("umount", str(m.mountpoint), "--timeout", "2", check=False)
        took = time.monotonic() - started
        line = one_error_line(result)
        assert f"is unmounted, but its worker (pid {pid}) is still running" in line
        assert f"kill -9 {pid}" in line
        assert took < 60
        assert runtime.alive(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    # SIGCONT delivers the SIGTERM umount sent: the worker goes.
    eventually(lambda: not runtime.alive(pid), what="the worker to exit")
    assert not os.path.ismount(m.mountpoint)


def sigterm_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return bool(int(fields["ShdPnd"], 16) & (1 << (signal.SIGTERM - 1)))


def test_umount_stops_a_worker_that_outlives_its_view_and_says_so(s3, bucket, mount_dataset):
    """Past --timeout the worker gets SIGTERM; once it has gone, umount exits 0 with a warning."""
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    m = mount_dataset(bucket, "ds")
    record = runtime.lookup(m.mountpoint)
    os.kill(record.pid, signal.SIGSTOP)
    umount = subprocess.Popen([sys.executable, "-m", "datahoard.cli", "umount", str(m.mountpoint), "--timeout", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: sigterm_pending(record.pid), what="umount to send SIGTERM")
    finally:
        os.kill(record.pid, signal.SIGCONT)
    _, err = umount.communicate(timeout=60)
    assert umount.returncode == 0, err
    assert err.strip() == (f"datahoard: warning: the worker (pid {record.pid}) had not exited 1 s after the "
                           f"unmount; stopped it with SIGTERM (log {record.log_file})")
    assert not runtime.alive(record.pid) and not os.path.ismount(m.mountpoint)


# -- mount: one mount per mountpoint -------------------------------------------------------
def test_a_refused_second_mount_leaves_a_direct_mount_serving(s3, bucket, mount_dataset, tmp_path, s3_server,
                                                              try_mount):
    files = {f"f{i}.bin": os.urandom(5000 + i) for i in range(5)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="ds/" + key, Body=body)
    m = mount_dataset(bucket, "ds", "--warm", "--wait", "--direct")
    assert m.stats().serving == "direct"
    pid = runtime.lookup(m.mountpoint).pid
    layers = mounts_at(m.mountpoint)
    result = try_mount(*mount_args(bucket, m.mountpoint, tmp_path / "other-cache", s3_server.endpoint))
    line = one_error_line(result)
    assert line == (f"datahoard: error: {m.mountpoint} is already served by datahoard (pid {pid}, "
                    f"s3://{bucket}/ds); datahoard umount it first")
    # Nothing was touched: the tree's bind is still on top, the first worker still serves.
    time.sleep(2)  # the first worker checks its bind every second: give it the chance to react
    assert mounts_at(m.mountpoint) == layers
    assert runtime.alive(pid) and m.stats().serving == "direct"
    assert {k: (m.mountpoint / k).read_bytes() for k in files} == files


def test_mounts_started_together_leave_one_mount_and_umount_clears_it(s3, bucket, tmp_path, s3_server):
    """Check-then-mount under a lock: of two mounts started at once, one mounts; the other is
    refused; after one umount nothing is left (no second FUSE layer, no second worker)."""
    for i in range(200):  # a listing that takes a moment widens the window a race would need
        s3.put_object(Bucket=bucket, Key=f"ds/f{i:03d}", Body=b"x")
    mnt = tmp_path / "mnt"
    argv = [[sys.executable, "-m", "datahoard.cli",
             *mount_args(bucket, mnt, tmp_path / f"cache{n}", s3_server.endpoint)] for n in range(2)]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argv]
    try:
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        pids = [int(out.split("(pid ")[1].split(",")[0]) for out, _, code in results if code == 0]
        codes = sorted(code for _, _, code in results)
        assert codes == [0, 1], results
        [(_, err, _)] = [r for r in results if r[2] == 1]
        assert err.count("\n") == 1 and (
            f"another datahoard mount or umount of {mnt} is in progress" in err or f"{mnt} is already served by datahoard" in err
        ), err
        datahoard("umount", str(mnt))
        assert mounts_at(mnt) == []
        assert not any(runtime.alive(pid) for pid in pids)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        while mounts_at(mnt):
            force_unmount(mnt)


def test_mount_and_umount_wait_for_nobody_while_the_mountpoint_is_locked(bucket, tmp_path, s3_server, try_mount):
    """While one datahoard process starts (or stops) a mount, others on that mountpoint are
    refused at once, naming it, and touch nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with runtime.MountLock(mnt):  # as a `datahoard mount` still listing its source holds it
        for result in (try_mount(*mount_args(bucket, mnt, tmp_path / "c", s3_server.endpoint)),
                       datahoard("umount", str(mnt), check=False)):
            line = one_error_line(result)
            assert f"another datahoard mount or umount of {mnt} is in progress (pid {os.getpid()})" in line
        assert not os.path.ismount(mnt)
    # Released: the mount goes ahead (and fails only for want of objects).
    result = try_mount(*mount_args(bucket, mnt, tmp_path / "c", s3_server.endpoint))
    assert "nothing to serve" in one_error_line(result)


# -- mount: directories --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cache-in-mountpoint", "mountpoint-in-cache", "cache-linked-into-mountpoint",
                                    "same-directory"])
def test_cache_and_mountpoint_must_not_nest(s3, bucket, tmp_path, s3_server, try_mount, layout):
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    if layout == "cache-in-mountpoint":
        cache = mnt / "cache"
    elif layout == "mountpoint-in-cache":
        mnt = cache / "mnt"
    elif layout == "cache-linked-into-mountpoint":
        (mnt / "real-cache").mkdir(parents=True)
        cache = tmp_path / "link"
        cache.symlink_to(mnt / "real-cache")
    else:
        cache = mnt
    line = one_error_line(try_mount(*mount_args(bucket, mnt, cache, s3_server.endpoint)))
    assert " is inside the " in line
    assert not os.path.ismount(mnt)


def test_an_unwritable_cache_directory_is_one_line(s3, bucket, tmp_path, s3_server, tmpfs, try_mount):
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    readonly = tmpfs(tmp_path / "ro", "ro,size=1m")
    line = one_error_line(try_mount(*mount_args(bucket, tmp_path / "m1", readonly / "cache", s3_server.endpoint)))
    assert line == (f"datahoard: error: cannot use the cache directory {readonly / 'cache'}: "
                    f"Read-only file system; choose a writable --cache-dir")
    (tmp_path / "file").write_text("not a directory")
    line = one_error_line(try_mount(*mount_args(bucket, tmp_path / "m2", tmp_path / "file" / "cache",
                                                s3_server.endpoint)))
    assert "cannot use the cache directory" in line and "Not a directory" in line


# -- mount: arguments ----------------------------------------------------------------------
def test_credentials_in_the_endpoint_url_are_refused_without_repeating_them(bucket, tmp_path, s3_server, try_mount):
    host = s3_server.endpoint.removeprefix("http://")
    result = try_mount(*mount_args(bucket, tmp_path / "mnt", tmp_path / "c", f"http://admin:hunter2@{host}"))
    line = one_error_line(result)
    assert "--endpoint-url must not contain credentials" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "hunter2" not in result.stderr + result.stdout
    assert f"--endpoint-url http://{host}" in line
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("option, value, message", [
    ("--capacity", "0", "must be at least 1 byte, got '0'"),
    ("--capacity", "0.4", "must be at least 1 byte, got '0.4'"),
    ("--bandwidth-limit", "0", "must be at least 1 byte, got '0'"),
    ("--parallelism", "0", "must be between 1 and 1024, got 0"),
    ("--parallelism", "-5", "must be between 1 and 1024, got -5"),
])
def test_limits_that_mean_nothing_are_refused(bucket, tmp_path, s3_server, try_mount, option, value, message):
    result = try_mount(*mount_args(bucket, tmp_path / "mnt", tmp_path / "c", s3_server.endpoint, option, value))
    line = one_error_line(result, code=2)
    assert line == f"datahoard mount: error: argument {option}: {message} (see datahoard mount --help)"
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_prefix_with_nothing_under_it_is_an_error_and_an_empty_bucket_is_not(s3, bucket, tmp_path, s3_server,
                                                                              mount_dataset, try_mount):
    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"x")
    result = try_mount("mount", f"s3://{bucket}/dss", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"),
                       "--endpoint-url", s3_server.endpoint)
    line = one_error_line(result)
    assert line == (f"datahoard: error: nothing to serve: no files under s3://{bucket}/dss; "
                    f"check the path (it is listed again at the next mount)")
    assert not os.path.ismount(tmp_path / "mnt")
    # Filters that leave nothing say so.
    result = try_mount(*mount_args(bucket, tmp_path / "mnt2", tmp_path / "c2", s3_server.endpoint,
                                   "--include", "*.jpg"))
    assert "no files under s3://" in one_error_line(result) and "match --include/--exclude" in result.stderr
    # A bucket that exists and is empty is what was asked for: an empty view.
    s3.create_bucket(Bucket=f"{bucket}-empty")
    m = mount_dataset(f"{bucket}-empty", "")
    assert os.listdir(m.mountpoint) == []


def test_allow_other_without_user_allow_other_says_so(bucket, tmp_path, s3_server):
    """Not root, and /etc/fuse.conf without ``user_allow_other``: fusermount3 would refuse
    ``allow_other`` and libfuse say only ``RuntimeError: 4``. A private mount namespace gives
    the command a fuse.conf without the line, and a user namespace makes it non-root."""
    if subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode:
        pytest.skip("user namespaces are not available")
    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\nmount_max = 1000\n")
    cli = [sys.executable, "-m", "datahoard.cli",
           *mount_args(bucket, tmp_path / "mnt", tmp_path / "c", s3_server.endpoint)]
    script = 'mount --bind "$1" /etc/fuse.conf && shift && exec unshare --user "$@"'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             str(conf), *cli], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    line = one_error_line(result)
    assert line == ("datahoard: error: letting every user read the view (the default) needs a line "
                    "'user_allow_other' in /etc/fuse.conf when not mounting as root; add it, or pass "
                    "--no-allow-other")
    assert not os.path.ismount(tmp_path / "mnt")
