"""A worker of a Dataset without a Secret must not be able to use the node's cloud identity
(issue 13, item 4). The worker's environment is the one the operator builds for its DaemonSet;
the Source is built from it by the worker's own code (cache_worker/sources.py) against a real
S3 server (moto) and a fake instance metadata service that would hand out credentials to
anyone who asks. Anonymous and Secret workers never ask; only NodeIdentity does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from datahoard.api import Dataset
from datahoard.cache_worker.sources import open_source
from datahoard.operator import workers
from datahoard.operator.config import OperatorSettings
from tests.support.metadata import FakeMetadata

SETTINGS = OperatorSettings(namespace="datahoard-system", host_root=Path("/var/lib/datahoard"))


@pytest.fixture
def metadata() -> Iterator[tuple[str, list[str]]]:
    FakeMetadata.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", FakeMetadata.requests
    server.shutdown()
    server.server_close()


def worker_env(spec_source: dict, secret: dict[str, str] | None = None) -> dict[str, str]:
    """The worker container's environment as kubelet would give it (Secret refs resolved)."""
    ds = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d", "uid": "u"},
                            "spec": {"source": spec_source}})
    manifest = workers.worker_daemonset(ds, ["n"], SETTINGS, "hash" if secret else None)
    env = {}
    for var in manifest["spec"]["template"]["spec"]["containers"][0]["env"]:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            if ref["key"] in (secret or {}):
                env[var["name"]] = secret[ref["key"]]
        elif "value" in var:
            env[var["name"]] = var["value"]
    return env


def use_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str],
            metadata_url: str) -> None:
    """A pod's environment: nothing but what the container spec says, and a metadata service
    at its usual place (here: the fake). No ~/.aws either."""
    import os

    for key in list(os.environ):
        if key.startswith("AWS_") or key.startswith("DATAHOARD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", metadata_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def list_keys(source) -> list[str]:
    try:
        return sorted(o.key for o in source.list())
    finally:
        source.close()


@pytest.mark.integration  # needs the S3 server (moto) process
def test_a_dataset_without_a_secret_never_reaches_the_node_identity(
        monkeypatch, tmp_path, metadata, s3_server, s3, bucket) -> None:
    url, requests = metadata
    s3.put_object(Bucket=bucket, Key="pub/a.bin", Body=b"public")
    use_env(monkeypatch, tmp_path, worker_env({"uri": f"s3://{bucket}/pub/"}), url)
    source = open_source(f"s3://{bucket}/pub/", endpoint_url=s3_server.endpoint,
                         region="us-east-1")
    assert list_keys(source) == ["a.bin"]  # unsigned requests: a public bucket still reads
    assert requests == [], f"an anonymous worker asked the metadata service: {requests}"


@pytest.mark.integration
def test_a_secret_dataset_uses_its_keys_and_never_the_node_identity(
        monkeypatch, tmp_path, metadata, s3_server, s3, bucket) -> None:
    url, requests = metadata
    s3.put_object(Bucket=bucket, Key="priv/a.bin", Body=b"x")
    env = worker_env({"uri": f"s3://{bucket}/priv/", "secretRef": {"name": "creds"}},
                     {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    use_env(monkeypatch, tmp_path, env, url)
    source = open_source(f"s3://{bucket}/priv/", endpoint_url=s3_server.endpoint,
                         region="us-east-1")
    assert list_keys(source) == ["a.bin"]
    assert requests == []


@pytest.mark.integration
def test_node_identity_is_the_only_way_to_the_metadata_service(
        monkeypatch, tmp_path, metadata, s3_server, bucket) -> None:
    """The control: the fake metadata service does hand out the node's role when asked, so the
    two tests above would see a worker that used it."""
    url, requests = metadata
    env = worker_env({"uri": f"s3://{bucket}/x/", "credentials": "NodeIdentity"})
    use_env(monkeypatch, tmp_path, env, url)
    source = open_source(f"s3://{bucket}/x/", endpoint_url=s3_server.endpoint, region="us-east-1")
    try:
        creds = source._client._request_signer._credentials  # what botocore will sign with
        assert creds is not None and creds.get_frozen_credentials().access_key == "NODEKEY"
    finally:
        source.close()
    assert any("security-credentials" in r for r in requests), requests
