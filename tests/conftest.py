"""Shared fixtures: a real S3 server (moto in server mode, over HTTP) and real mounts.

Integration tests need root and /dev/fuse; on a machine without them they are skipped with
that reason (CI runs as root with /dev/fuse, so they run there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

FUSE_MISSING = (
    "needs root, /dev/fuse and fusermount3"
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
    else None
)

# One set of fake credentials for the whole run; moto accepts any unless auth is switched on.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# Keep mount records of tests away from the machine's.
os.environ.setdefault("DATAHOARD_RUN_DIR", f"/tmp/datahoard-test-run-{os.getpid()}")
# Retries that fail fast: error tests must not wait for minutes.
os.environ.setdefault("DATAHOARD_S3_MAX_ATTEMPTS", "3")


def pytest_collection_modifyitems(config, items):
    if FUSE_MISSING:
        skip = pytest.mark.skip(reason=f"integration test {FUSE_MISSING}")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def client(self, **creds):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_moto(env: dict[str, str] | None = None) -> S3Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return S3Server(endpoint, process)
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("moto server exited at start") from None
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start in 30 s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server):
    return s3_server.client()


@pytest.fixture
def bucket(s3) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@dataclass
class Mount:
    mountpoint: Path
    cache_dir: Path
    source: str
    endpoint: str | None = None

    def stats(self):
        from datahoard import runtime

        record = runtime.lookup(self.mountpoint)
        assert record is not None, f"no mount record for {self.mountpoint}"
        return runtime.fetch_stats(record.stats_url)


def datahoard(*args: str, check: bool = True, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "datahoard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"datahoard {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


@pytest.fixture
def mount_dataset(tmp_path: Path, s3_server: S3Server) -> Iterator[Callable[..., Mount]]:
    """Mount ``s3://bucket/prefix`` with ``datahoard mount``; unmounts whatever is left after."""
    mounted: list[Mount] = []

    def mount(bucket: str, prefix: str = "", *extra: str, cache_dir: Path | None = None,
              mountpoint: Path | None = None, endpoint: str | None = None,
              env: dict[str, str] | None = None) -> Mount:
        n = len(mounted)
        m = Mount(
            mountpoint=mountpoint or tmp_path / f"mnt{n}",
            cache_dir=cache_dir or tmp_path / f"cache{n}",
            source=f"s3://{bucket}/{prefix}",
            endpoint=endpoint or s3_server.endpoint,
        )
        datahoard("mount", m.source, str(m.mountpoint), "--cache-dir", str(m.cache_dir),
                  "--endpoint-url", m.endpoint, *extra, env=env)
        mounted.append(m)
        return m

    yield mount
    for m in mounted:
        if os.path.ismount(m.mountpoint):
            datahoard("umount", str(m.mountpoint), check=False)
        force_unmount(m.mountpoint)


def unmount(m: Mount) -> None:
    datahoard("umount", str(m.mountpoint))
    assert not os.path.ismount(m.mountpoint)


def mounts_at(path: Path) -> list[tuple[str, str]]:
    """(fstype, root) of every mount stacked at ``path``, bottom first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == str(path):
                out.append((right.split()[0], fields[3]))
    return out


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    """Poll ``predicate`` every 0.1 s until it returns something true (returned) or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
