"""A user other than root mounts, reads and unmounts: the mount goes through ``fusermount3``
(which passes the /dev/fuse descriptor back over a socket, fusell/connection.py), and the
features that need root (passthrough, fanotify) stand aside and say so instead of failing.
Run as ``nobody`` with ``setpriv``; everything the user touches is under a directory it owns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.support.mounts import mounts_at

pytestmark = pytest.mark.integration

NOBODY = 65534


def python_for_nobody(home: Path) -> tuple[str, dict[str, str]]:
    """A Python that ``nobody`` may run, with this venv's packages: the venv's interpreter may
    live where only root may look (pyenv under /root), so the system's 3.11 is used with a
    ``sitecustomize`` that adds the venv's site-packages (its .pth files map the package)."""
    system = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
    if system is None or os.path.realpath(system).startswith("/root/"):
        pytest.skip("needs a Python 3.11 outside /root that the user nobody may run")
    site_dir = sysconfig.get_paths()["purelib"]
    custom = home / "pysite"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({site_dir!r})\n")
    return system, {"PYTHONPATH": str(custom)}


def as_nobody(*cmd: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def dev_fuse_for_users():
    """/dev/fuse as distributions set it up (udev: mode 0666): fusermount3 opens it as the user.
    Some sandboxes leave it 0600; the test makes it 0666 for its duration, as on any desktop."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    if mode != 0o666:
        os.chmod("/dev/fuse", 0o666)
    yield
    if mode != 0o666:
        os.chmod("/dev/fuse", mode)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to run as another user")
def test_a_user_other_than_root_mounts_reads_and_unmounts(s3, bucket, s3_server, dev_fuse_for_users):
    files = {"a.bin": os.urandom(70_000), "d/b.bin": os.urandom(9 << 20)}  # b.bin spans two chunks
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    home = Path(tempfile.mkdtemp(prefix="dh-nonroot-", dir="/tmp"))
    try:
        os.chown(home, NOBODY, NOBODY)
        python, extra = python_for_nobody(home)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **extra}
        mnt = home / "mnt"
        cli = (python, "-m", "datahoard.cli")
        mounted = as_nobody(*cli, "mount", f"s3://{bucket}/ds", str(mnt), "--cache-dir", str(home / "cache"),
                            "--endpoint-url", s3_server.endpoint, "--no-allow-other", env=env)
        assert mounted.returncode == 0, mounted.stderr
        try:
            assert [fstype for fstype, _ in mounts_at(mnt)] == ["fuse.datahoard"]  # made by fusermount3
            for key, body in files.items():
                for _ in range(2):  # a miss, then a hit
                    assert read_as_nobody(mnt / key, env) == body, key
            status = as_nobody(*cli, "status", str(mnt), env=env)
            assert status.returncode == 0 and "ready        yes" in status.stdout, status.stdout + status.stderr
            # Without allow_other, nobody else (root included) may look in.
            with pytest.raises(PermissionError):
                os.listdir(mnt)
        finally:
            gone = as_nobody(*cli, "umount", str(mnt), env=env)
        assert gone.returncode == 0, gone.stderr
        assert not mounts_at(mnt)
    finally:
        subprocess.run(["fusermount3", "-uz", str(home / "mnt")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def read_as_nobody(path: Path, env: dict[str, str]) -> bytes:
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", str(path)],
                         env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout
