"""The S3 source against a real S3 server over HTTP (moto in server mode).

Reads go through the lean GET path (:mod:`cache_worker.s3_get`); listing and HEAD through
botocore. Faults come from the fault-injecting proxy of ``tests/support/faults.py``.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from datahoard.cache_worker.s3 import S3Options, S3Source
from datahoard.cache_worker.s3_client import parse_s3_uri
from datahoard.cache_worker.source import (
    RemoteObject,
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceTransientError,
    SourceUnreachable,
)
from tests.support.faults import Fault, FaultProxy
from tests.support.ports import free_port
from tests.support.s3server import start_moto

pytestmark = pytest.mark.integration


def source(server, uri, **opts) -> S3Source:
    return S3Source(uri, S3Options(endpoint_url=server.endpoint, max_attempts=2, **opts))


@pytest.mark.parametrize(
    "uri, bucket, prefix",
    [("s3://b1/", "b1", ""), ("s3://b1", "b1", ""), ("s3://b1/train", "b1", "train/"), ("s3://b1/a/b/", "b1", "a/b/")],
)
def test_parse_uri(uri, bucket, prefix):
    assert parse_s3_uri(uri) == (bucket, prefix)


@pytest.mark.parametrize("uri", ["gs://b/x", "s3://", "s3://UPPER/x", "s3://b!/"])
def test_parse_uri_rejects(uri):
    with pytest.raises(SourceError):
        parse_s3_uri(uri)


def test_listing_is_paginated_and_scoped_to_the_prefix(s3_server, s3, bucket):
    for i in range(1205):  # more than one 1000-key page
        s3.put_object(Bucket=bucket, Key=f"train/{i:05d}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="train2/outside", Body=b"x")
    listed = list(source(s3_server, f"s3://{bucket}/train").list())
    assert len(listed) == 1205
    assert listed[0].key == "00000" and listed[0].size == 1 and len(listed[0].etag) == 32


@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_ranged_reads_return_exact_bytes(s3_server, s3, bucket, client):
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    src = source(s3_server, f"s3://{bucket}/", client=client)  # botocore: the escape hatch
    assert (src._getter is None) == (client == "botocore")
    obj = src.stat("obj")
    assert src.read(obj, 0, len(body)) == body
    assert src.read(obj, 12345, 1000) == body[12345:13345]
    assert src.read(obj, len(body) - 1, 1) == body[-1:]
    assert src.read(obj, 0, 1) == body[:1]


def test_stored_content_encoding_is_not_decoded(s3_server, s3, bucket):
    import gzip

    body = gzip.compress(b"x" * 50_000)
    s3.put_object(Bucket=bucket, Key="obj.gz", Body=body, ContentEncoding="gzip")
    src = source(s3_server, f"s3://{bucket}/")
    obj = src.stat("obj.gz")
    assert src.read(obj, 0, obj.size) == body
    assert src.read(obj, 10, 20) == body[10:30]


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "ranged"])
def test_object_replaced_after_listing_is_refused(s3_server, s3, bucket, whole):
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version one")
    src = source(s3_server, f"s3://{bucket}/")
    listed = src.stat("obj")
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version two")
    start, length = (0, listed.size) if whole else (2, 5)
    with pytest.raises(SourceChanged, match=f"s3://{bucket}/obj changed since it was listed"):
        src.read(listed, start, length)


def test_reading_a_missing_object_or_bucket(s3_server, bucket):
    gone = RemoteObject(key="gone", size=10, etag="0" * 32, mtime=0.0)
    with pytest.raises(SourceNotFound, match=f"not found: s3://{bucket}/gone"):
        source(s3_server, f"s3://{bucket}/").read(gone, 0, 10)
    with pytest.raises(SourceNotFound, match="bucket does not exist: s3://no-such-bucket/p/gone"):
        source(s3_server, "s3://no-such-bucket/p").read(gone, 0, 10)


def test_reading_from_an_unreachable_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"
    src = S3Source("s3://b/p", S3Options(endpoint_url=endpoint, max_attempts=2))
    obj = RemoteObject(key="k", size=10, etag="", mtime=0.0)
    with pytest.raises(SourceUnreachable, match=f"cannot reach S3 endpoint {endpoint} for s3://b/p/k"):
        src.read(obj, 0, 10)


def test_read_timeout_applies_and_names_the_object():
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        src = S3Source("s3://b/", S3Options(endpoint_url=endpoint, max_attempts=2, read_timeout=0.3))
        started = time.monotonic()
        with pytest.raises(SourceTransientError, match="s3://b/k failed: .*[Tt]imed? ?out"):
            src.read(RemoteObject(key="k", size=10, etag="", mtime=0.0), 0, 10)
        assert time.monotonic() - started < 5


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=503, s3_code="SlowDown", times=2),
        Fault(status=500, s3_code="InternalError", times=2),
        Fault(status=502, s3_code="BadGateway", times=2),
        Fault(cut_after=1000, times=2),  # connection reset mid-body, twice
    ],
    ids=["slowdown", "500", "502", "reset-mid-body"],
)
def test_transient_faults_are_retried_to_the_right_bytes(s3, bucket, proxy, fault):
    body = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    src = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=proxy.endpoint, max_attempts=3))
    (obj,) = src.list()  # not stat: the proxy answers HEAD without a Content-Length
    proxy.add(fault)
    assert src.read(obj, 0, obj.size) == body
    proxy.add(Fault(**{**fault.__dict__, "times": 2}))
    assert src.read(obj, 1000, 200_000) == body[1000:201_000]
    assert proxy.injected == 4


@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_persistent_failure_is_bounded_and_names_the_object(s3, bucket, proxy, client):
    s3.put_object(Bucket=bucket, Key="broken", Body=b"x" * 100)
    src = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=proxy.endpoint, max_attempts=4,
                                                         client=client))
    assert (src._getter is None) == (client == "botocore")
    (obj,) = src.list()
    proxy.add(Fault(status=503, s3_code="SlowDown", times=100))
    with pytest.raises(SourceTransientError, match=f"s3://{bucket}/broken: SlowDown: injected"):
        src.read(obj, 0, obj.size)
    assert proxy.injected == 4  # max_attempts in total: exactly one loop retries, on either path


def test_a_listing_page_is_retried_by_one_loop_only(s3, bucket, proxy):
    """Listing goes through botocore, whose own retries would multiply ours (4 x 4 = 16)."""
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x")
    src = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=proxy.endpoint, max_attempts=4))
    proxy.add(Fault(status=503, s3_code="SlowDown", times=100))
    with pytest.raises(SourceTransientError, match=f"s3://{bucket}/: SlowDown"):
        list(src.list())
    assert proxy.injected == 4
    proxy.faults.clear()
    proxy.add(Fault(status=500, s3_code="InternalError", times=3))
    assert [o.key for o in src.list()] == ["obj"]  # the fourth attempt gets through
    assert proxy.injected == 4 + 3


@pytest.mark.parametrize("code, status", [("AccessDenied", 403), ("NoSuchKey", 404),
                                          ("PreconditionFailed", 412)])
@pytest.mark.parametrize("client", ["lean", "botocore"])
def test_permanent_answers_are_not_retried(s3, bucket, proxy, client, code, status):
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x" * 100)
    src = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=proxy.endpoint, max_attempts=4,
                                                client=client))
    (obj,) = src.list()
    proxy.add(Fault(status=status, s3_code=code, times=100))
    with pytest.raises((SourcePermissionDenied, SourceNotFound, SourceChanged)):
        src.read(obj, 0, obj.size)
    assert proxy.injected == 1


def test_a_client_error_is_not_retried(s3, bucket, proxy):
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x" * 100)
    src = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=proxy.endpoint, max_attempts=4))
    (obj,) = src.list()
    proxy.add(Fault(status=400, s3_code="InvalidArgument", times=100))
    with pytest.raises(SourceError, match=f"s3://{bucket}/obj: InvalidArgument: injected") as info:
        src.read(obj, 0, obj.size)
    assert not isinstance(info.value, SourceTransientError)
    assert proxy.injected == 1


def test_anonymous_reads_are_unsigned(s3_server, s3, bucket, monkeypatch, auth_server):
    """With no credentials anywhere in the chain, requests carry no signature at all."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    body = os.urandom(5000)
    s3.put_object(Bucket=bucket, Key="pub", Body=body, ACL="public-read")  # client made earlier
    src = source(s3_server, f"s3://{bucket}/")
    assert src.read(RemoteObject("pub", len(body), "", 0.0), 0, len(body)) == body
    # Against a server that checks: an unsigned request is denied as anonymous (403), where
    # a signed one with unknown keys would be rejected as InvalidAccessKeyId.
    server, _, _ = auth_server
    with pytest.raises(SourcePermissionDenied, match="access denied to s3://private/data/x"):
        source(server, "s3://private/data").read(RemoteObject("x", 6, "", 0.0), 0, 6)


def test_missing_bucket(s3_server):
    with pytest.raises(SourceNotFound, match="bucket does not exist: s3://no-such-bucket/"):
        list(source(s3_server, "s3://no-such-bucket/x").list())


def test_missing_object(s3_server, bucket):
    with pytest.raises(SourceNotFound, match="not found"):
        source(s3_server, f"s3://{bucket}/").stat("gone")


def test_unreachable_endpoint():
    src = S3Source("s3://b/", S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2))
    # The cause in a few words (it reaches the Dataset's condition), not botocore's request URL.
    with pytest.raises(SourceUnreachable,
                       match=r"^cannot reach S3 endpoint http://127\.0\.0\.1:\d+ for s3://b/: connection refused$"):
        list(src.list())


@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that checks credentials and IAM policies.

    moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unauthenticated; they
    create an allowed user, a user with no permissions, and a bucket with one object.
    """
    import boto3

    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "7"})
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader",
        PolicyName="read",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
        '"Action":["s3:*","iam:*","sts:*"],"Resource":"*"}]}',
    )
    reader = iam.create_access_key(UserName="reader")["AccessKey"]
    iam.create_user(UserName="nobody")
    nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
    s3 = server.client()
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="data/x", Body=b"secret")
    yield server, reader, nobody
    server.stop()


def _as(server, service, key):
    import boto3

    return boto3.client(service, endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])


def _keyed(server, key) -> S3Source:
    return source(server, "s3://private/data", access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])


def test_valid_credentials_read(auth_server):
    server, reader, _ = auth_server
    assert [o.key for o in _keyed(server, reader).list()] == ["x"]


def test_wrong_credentials(auth_server):
    server, _, _ = auth_server
    bogus = {"AccessKeyId": "AKIAWRONGWRONGWRONG1", "SecretAccessKey": "nope"}
    with pytest.raises(SourceAuthError, match="rejected the credentials"):
        list(_keyed(server, bogus).list())


def test_access_denied(auth_server):
    server, _, nobody = auth_server
    with pytest.raises(SourcePermissionDenied, match="access denied to s3://private/data/"):
        list(_keyed(server, nobody).list())


_X = RemoteObject(key="x", size=6, etag="", mtime=0.0)


def test_valid_credentials_read_bytes(auth_server):
    server, reader, _ = auth_server
    src = _keyed(server, reader)
    assert src._getter is not None
    x = src.stat("x")
    assert src.read(x, 0, 6) == b"secret" and src.read(x, 1, 3) == b"ecr"


def test_awkward_keys_are_encoded_and_signed_like_botocore(auth_server):
    server, reader, _ = auth_server
    s3 = _as(server, "s3", reader)
    keys = ["dir with space/a+b=c&d~e%f.bin", "ünï/çödé (1).bin", "semi;colon,comma/@at!*'()$.bin"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket="private", Key=f"awk/{key}", Body=b"%d" % i * 1000)
    src = source(server, "s3://private/awk", access_key=reader["AccessKeyId"],
                 secret_key=reader["SecretAccessKey"])
    for obj in src.list():
        i = keys.index(obj.key)
        assert src.read(obj, 0, obj.size) == b"%d" % i * 1000
        assert src.read(obj, 10, 5) == b"%d" % i * 5


@pytest.fixture
def localhost_names(monkeypatch):
    """``<bucket>.localhost`` resolves to the loopback, as systemd-resolved does: what
    virtual-host addressing of a local server needs (glibc's files+dns here does not)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("style", ["path", "virtual"])
def test_signed_gets_are_accepted_in_both_addressing_styles(auth_server, localhost_names, style):
    """botocore resolves the URL and signs it; a server that checks signatures accepts the
    right key and refuses a wrong one, whichever way the bucket is addressed."""
    server, reader, _ = auth_server
    endpoint = server.endpoint.replace("127.0.0.1", "localhost")
    port = endpoint.rpartition(":")[2]

    def keyed(secret: str) -> S3Source:
        return S3Source("s3://private/data", S3Options(
            endpoint_url=endpoint, max_attempts=1, addressing_style=style,
            access_key=reader["AccessKeyId"], secret_key=secret))

    src = keyed(reader["SecretAccessKey"])
    assert src._getter.target.url_prefix == (
        f"http://private.localhost:{port}/" if style == "virtual" else f"{endpoint}/private/")
    assert src.read(_X, 0, 6) == b"secret" and src.read(_X, 1, 3) == b"ecr"
    with pytest.raises(SourceAuthError, match="SignatureDoesNotMatch"):
        keyed("not-the-secret").read(_X, 0, 6)


def test_wrong_secret_key_on_read(auth_server):
    server, reader, _ = auth_server
    wrong = {"AccessKeyId": reader["AccessKeyId"], "SecretAccessKey": "not-the-secret"}
    with pytest.raises(SourceAuthError, match="S3 rejected the credentials for s3://private/data/x: "
                                              "SignatureDoesNotMatch"):
        _keyed(server, wrong).read(_X, 0, 6)


def test_unknown_access_key_on_read(auth_server):
    server, _, _ = auth_server
    bogus = {"AccessKeyId": "AKIAWRONGWRONGWRONG1", "SecretAccessKey": "nope"}
    with pytest.raises(SourceAuthError, match="rejected the credentials for s3://private/data/x: "
                                              "InvalidAccessKeyId"):
        _keyed(server, bogus).read(_X, 0, 6)


def test_access_denied_on_read(auth_server):
    server, _, nobody = auth_server
    with pytest.raises(SourcePermissionDenied, match="access denied to s3://private/data/x"):
        _keyed(server, nobody).read(_X, 0, 6)


def test_session_token(auth_server):
    server, reader, _ = auth_server
    iam = _as(server, "iam", reader)
    iam.create_role(
        RoleName="datahoard-reader",
        AssumeRolePolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
        '"Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}',
    )
    iam.put_role_policy(
        RoleName="datahoard-reader", PolicyName="s3",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
    )
    creds = _as(server, "sts", reader).assume_role(
        RoleArn="arn:aws:iam::123456789012:role/datahoard-reader", RoleSessionName="test"
    )["Credentials"]

    def with_token(token):
        return source(server, "s3://private/data", access_key=creds["AccessKeyId"],
                      secret_key=creds["SecretAccessKey"], session_token=token)

    assert with_token(creds["SessionToken"]).read(_X, 0, 6) == b"secret"
    with pytest.raises(SourceAuthError, match="rejected the credentials for s3://private/data/x: InvalidToken"):
        with_token("not-the-token").read(_X, 0, 6)
