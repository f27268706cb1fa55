"""The S3 source against a real S3 server over HTTP (moto in server mode)."""

from __future__ import annotations

import os

import pytest

from datahoard.cache_worker.s3 import S3Options, S3Source, parse_s3_uri
from datahoard.cache_worker.source import (
    SourceAuthError,
    SourceChanged,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
    SourceUnreachable,
)
from tests.conftest import free_port, start_moto

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


def test_ranged_reads_return_exact_bytes(s3_server, s3, bucket):
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    src = source(s3_server, f"s3://{bucket}/")
    obj = src.stat("obj")
    assert src.read(obj, 0, len(body)) == body
    assert src.read(obj, 12345, 1000) == body[12345:13345]
    assert src.read(obj, len(body) - 1, 1) == body[-1:]


def test_object_replaced_after_listing_is_refused(s3_server, s3, bucket):
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version one")
    src = source(s3_server, f"s3://{bucket}/")
    listed = src.stat("obj")
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version two")
    with pytest.raises(SourceChanged, match="changed since it was listed"):
        src.read(listed, 0, listed.size)


def test_missing_bucket(s3_server):
    with pytest.raises(SourceNotFound, match="bucket does not exist: s3://no-such-bucket/"):
        list(source(s3_server, "s3://no-such-bucket/x").list())


def test_missing_object(s3_server, bucket):
    with pytest.raises(SourceNotFound, match="not found"):
        source(s3_server, f"s3://{bucket}/").stat("gone")


def test_unreachable_endpoint():
    src = S3Source("s3://b/", S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2))
    with pytest.raises(SourceUnreachable, match="cannot reach S3 endpoint http://127.0.0.1"):
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
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
    )
    reader = iam.create_access_key(UserName="reader")["AccessKey"]
    iam.create_user(UserName="nobody")
    nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
    s3 = server.client()
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="data/x", Body=b"secret")
    yield server, reader, nobody
    server.stop()


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
