"""Mounting and unmounting the systems under test; each gives a root directory and a daemon pid.

rclone and s3fs run in the foreground as our children (so their pid and CPU are known) with
the options a user following their docs would pick for a read-mostly dataset:
``rclone mount --vfs-cache-mode full`` and ``s3fs -o use_cache``. Datahoard runs through its own
CLI exactly as a user would (``datahoard mount``; the worker's pid is in its mount record);
with ``--direct`` it switches to serving the fully cached dataset from a tree of hard links
(:meth:`Datahoard.wait_direct`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .remote import ACCESS_KEY, BUCKET, SECRET_KEY


class MountError(RuntimeError):
    pass


def _wait_mounted(path: Path, proc: subprocess.Popen | None, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        if proc is not None and proc.poll() is not None:
            raise MountError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise MountError(f"{path} was not mounted after {timeout} s")


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Mounted:
    """One mounted system. ``close()`` is idempotent and always safe to call."""

    name = ""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid = 0
        self.mount_seconds = 0.0
        self._proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return str(self.mountpoint)

    def close(self) -> None:
        _unmount(self.mountpoint)
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class Rclone(Mounted):
    name = "rclone"

    def __init__(self, mountpoint: Path, cache_dir: Path, endpoint: str, log: Path) -> None:
        super().__init__(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        # The remote is configured through the environment (no rclone.conf is touched).
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # LoadCustomCABundleError
        env.update(RCLONE_CONFIG_DHBENCH_TYPE="s3", RCLONE_CONFIG_DHBENCH_PROVIDER="Minio",
                   RCLONE_CONFIG_DHBENCH_ENDPOINT=endpoint, RCLONE_CONFIG_DHBENCH_ACCESS_KEY_ID=ACCESS_KEY,
                   RCLONE_CONFIG_DHBENCH_SECRET_ACCESS_KEY=SECRET_KEY)
        remote = f"dhbench:{BUCKET}"
        start = time.monotonic()
        self._proc = subprocess.Popen(
            ["rclone", "mount", remote, str(mountpoint), "--vfs-cache-mode", "full",
             "--cache-dir", str(cache_dir), "--read-only", "--allow-other", "--log-file", str(log)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self.pid = self._proc.pid
        try:
            _wait_mounted(mountpoint, self._proc, log)
        except BaseException:
            self.close()
            raise
        self.mount_seconds = time.monotonic() - start


class S3fs(Mounted):
    name = "s3fs"

    def __init__(self, mountpoint: Path, cache_dir: Path, endpoint: str, log: Path) -> None:
        super().__init__(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        passwd = cache_dir.parent / f"{cache_dir.name}.passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        start = time.monotonic()
        with open(log, "wb") as logf:
            self._proc = subprocess.Popen(
                ["s3fs", BUCKET, str(mountpoint), "-f", "-o", f"url={endpoint}", "-o", "use_path_request_style",
                 "-o", f"use_cache={cache_dir}", "-o", f"passwd_file={passwd}", "-o", "ro",
                 "-o", "allow_other"],
                stdout=logf, stderr=subprocess.STDOUT,
            )
        self.pid = self._proc.pid
        try:
            _wait_mounted(mountpoint, self._proc, log)
        except BaseException:
            self.close()
            raise
        self.mount_seconds = time.monotonic() - start


def datahoard_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datahoard.cli", *args], env=env, capture_output=True, text=True)


class Datahoard(Mounted):
    name = "datahoard"

    def __init__(self, source: str, mountpoint: Path, cache_dir: Path, endpoint: str,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(mountpoint)
        from datahoard import runtime

        start = time.monotonic()
        done = datahoard_cli("mount", source, str(mountpoint), "--cache-dir", str(cache_dir),
                             "--endpoint-url", endpoint, *extra)
        self.mount_seconds = time.monotonic() - start
        if done.returncode:
            _unmount(mountpoint)
            raise MountError(f"datahoard mount failed: {done.stderr[-2000:]}")
        record = runtime.lookup(mountpoint)
        self.pid = record.pid if record else 0
        self.stats_url = record.stats_url if record else ""

    def stats(self):
        from datahoard import runtime

        return runtime.fetch_stats(self.stats_url)

    def wait_direct(self, timeout: float) -> float:
        """Wait until the worker serves from its direct tree (``--direct``); returns seconds."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            stats = self.stats()
            if stats.serving == "direct":
                return time.monotonic() - start
            if stats.direct.state == "failed":
                raise MountError(f"no direct tree: {stats.direct.message}")
            time.sleep(0.2)
        raise MountError(f"not serving direct after {timeout:g} s: {stats.direct.state} {stats.direct.message or ''}")

    def close(self) -> None:
        from datahoard import runtime

        # With --direct the top layer is a bind of the tree, on the cache's filesystem, which
        # os.path.ismount may not see: the mount record says whether the worker still runs.
        if os.path.ismount(self.mountpoint) or (self.pid and runtime.alive(self.pid)):
            if datahoard_cli("umount", str(self.mountpoint)).returncode:
                _unmount(self.mountpoint)
        deadline = time.monotonic() + 30
        while self.pid and runtime.alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
