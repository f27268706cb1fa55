"""Shared fixtures: a real S3 server (moto in server mode, over HTTP) and real mounts. The code
behind them lives in tests/support (import helpers from there, never from a conftest).

Integration tests need root and /dev/fuse; on a machine without them they are skipped with
that reason (CI runs as root with /dev/fuse, so they run there).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mounts import FUSE_MISSING, Mount, Mounts
from tests.support.s3server import S3Server, start_moto

# One set of fake credentials for the whole run; moto accepts any unless auth is switched on.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# Keep mount records of tests away from the machine's.
os.environ.setdefault("DATAHOARD_RUN_DIR", f"/tmp/datahoard-test-run-{os.getpid()}")
# Retries that fail fast: error tests must not wait for minutes.
os.environ.setdefault("DATAHOARD_S3_MAX_ATTEMPTS", "3")


#: Tiers whose tests need a tool built from source (envtest, helm, the node cluster).
BUILT_TOOL_TIERS = ("cluster", "chart", "node", "e2e")


#: Node ids of the tests that failed in this run, printed once more as the very last lines.
_FAILED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    label = report.nodeid if report.when == "call" else f"{report.nodeid} ({report.when})"
    if report.failed and label not in _FAILED:
        _FAILED.append(label)


def pytest_unconfigure(config: pytest.Config) -> None:
    """CI keeps only the tail of the output, and on CI pytest prints each failure's whole
    message in the short summary (a bytes diff runs to hundreds of lines), so the names of
    the failed tests can be cut off. They come last here, one short line each."""
    for nodeid in _FAILED:
        print(f"FAILED (again, in short): {nodeid}")


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects: `make test` selects on "tools"
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(tier in item.keywords for tier in BUILT_TOOL_TIERS):
            item.add_marker("tools")
    if FUSE_MISSING:
        skip = pytest.mark.skip(reason=f"integration test {FUSE_MISSING}")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


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


@pytest.fixture
def mount_dataset(tmp_path: Path, s3_server: S3Server) -> Iterator[Callable[..., Mount]]:
    """Mount ``s3://bucket/prefix`` with ``datahoard mount``; unmounts whatever is left after."""
    mounts = Mounts(tmp_path)

    def mount(bucket: str, prefix: str = "", *extra: str, endpoint: str | None = None,
              **options) -> Mount:
        return mounts.mount(f"s3://{bucket}/{prefix}", *extra,
                            endpoint=endpoint or s3_server.endpoint, **options)

    yield mount
    mounts.cleanup()
