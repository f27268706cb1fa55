"""The worker's environment, parsed once (cache_worker/settings.py): what each variable becomes,
and one clear error per bad value, naming the variable, before any source is opened."""

from __future__ import annotations

import pytest

from datahoard.cache_worker.hdfs import HdfsSource
from datahoard.cache_worker.s3 import S3Source
from datahoard.cache_worker.settings import SourceSettings
from datahoard.cache_worker.source import SourceAuthError, SourceError
from datahoard.cache_worker.sources import hdfs_options, open_source, s3_options


def test_defaults_and_nothing_from_the_process_environment(monkeypatch):
    monkeypatch.setenv("DATAHOARD_S3_MAX_ATTEMPTS", "9")
    settings = SourceSettings.from_env({})
    assert settings.s3_max_attempts == 5 and settings.s3_client == "lean"
    assert settings.source_credentials is None and settings.hdfs_namenodes == ()
    assert SourceSettings.from_env().s3_max_attempts == 9  # no mapping: the process's


def test_every_s3_variable_reaches_the_options():
    options = s3_options(SourceSettings.from_env({
        "DATAHOARD_SOURCE_CREDENTIALS": " Secret ",
        "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_SESSION_TOKEN": "tok",
        "DATAHOARD_S3_MAX_ATTEMPTS": "3", "DATAHOARD_S3_RETRY_DEADLINE": "40",
        "DATAHOARD_S3_CONNECT_TIMEOUT": "1.5", "DATAHOARD_S3_READ_TIMEOUT": "7",
        "DATAHOARD_S3_REQUEST_TIMEOUT": "20", "DATAHOARD_S3_CLIENT": "BOTOCORE",
        "DATAHOARD_S3_ADDRESSING_STYLE": "virtual",
    }), "http://minio:9000", "eu-west-1")
    assert (options.access_key, options.secret_key, options.session_token) == ("AKID", "sk", "tok")
    assert (options.max_attempts, options.retry_deadline, options.connect_timeout,
            options.read_timeout, options.request_timeout) == (3, 40.0, 1.5, 7.0, 20.0)
    assert (options.client, options.addressing_style, options.anonymous) == ("botocore", "virtual", False)
    assert (options.endpoint_url, options.region) == ("http://minio:9000", "eu-west-1")


def test_empty_variables_are_unset():
    settings = SourceSettings.from_env({"DATAHOARD_S3_MAX_ATTEMPTS": "", "DATAHOARD_HDFS_USER": ""})
    assert settings.s3_max_attempts == 5 and settings.hdfs_user is None


def test_hdfs_variables_and_hadoop_user_name():
    env = {"DATAHOARD_HDFS_NAMENODES": "nn1:9870, nn2:9870,", "HADOOP_USER_NAME": "hadoop",
           "DATAHOARD_HDFS_DELEGATION_TOKEN": "T0K", "DATAHOARD_HDFS_RETRY_DEADLINE": "30",
           "DATAHOARD_HDFS_REQUEST_TIMEOUT": "9"}
    options = hdfs_options(SourceSettings.from_env(env))
    assert options.namenodes == ("nn1:9870", "nn2:9870") and options.user == "hadoop"
    assert (options.delegation_token, options.retry_deadline, options.request_timeout) == ("T0K", 30.0, 9.0)
    assert hdfs_options(SourceSettings.from_env({**env, "DATAHOARD_HDFS_USER": "etl"})).user == "etl"
    # Anonymous: no identity from the Secret's variables, even when they leaked in.
    anonymous = hdfs_options(SourceSettings.from_env(
        {**env, "DATAHOARD_HDFS_USER": "etl", "DATAHOARD_SOURCE_CREDENTIALS": "anonymous"}))
    assert anonymous.user == "hadoop" and anonymous.delegation_token is None


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("DATAHOARD_S3_MAX_ATTEMPTS", "five", "DATAHOARD_S3_MAX_ATTEMPTS='five': Input should be a valid integer"),
        ("DATAHOARD_S3_MAX_ATTEMPTS", "0", "DATAHOARD_S3_MAX_ATTEMPTS='0': Input should be greater than or equal to 1"),
        ("DATAHOARD_S3_RETRY_DEADLINE", "-5", "DATAHOARD_S3_RETRY_DEADLINE='-5': Input should be greater than 0"),
        ("DATAHOARD_S3_CONNECT_TIMEOUT", "5s", "DATAHOARD_S3_CONNECT_TIMEOUT='5s': Input should be a valid number"),
        ("DATAHOARD_S3_READ_TIMEOUT", "0", "DATAHOARD_S3_READ_TIMEOUT='0': Input should be greater than 0"),
        ("DATAHOARD_S3_REQUEST_TIMEOUT", "inf", "DATAHOARD_S3_REQUEST_TIMEOUT='inf': Input should be a finite number"),
        ("DATAHOARD_S3_CLIENT", "curl", "DATAHOARD_S3_CLIENT='curl': Input should be 'lean' or 'botocore'"),
        ("DATAHOARD_S3_ADDRESSING_STYLE", "host", "DATAHOARD_S3_ADDRESSING_STYLE='host': Input should be 'path', 'virtual' or 'auto'"),
        ("DATAHOARD_SOURCE_CREDENTIALS", "iam", "DATAHOARD_SOURCE_CREDENTIALS='iam': Input should be 'anonymous', 'secret' or 'node-identity'"),
        ("DATAHOARD_HDFS_MAX_ATTEMPTS", "2.5", "DATAHOARD_HDFS_MAX_ATTEMPTS='2.5': Input should be a valid integer"),
        ("DATAHOARD_HDFS_RETRY_DEADLINE", "never", "DATAHOARD_HDFS_RETRY_DEADLINE='never': Input should be a valid number"),
        ("DATAHOARD_HDFS_REQUEST_TIMEOUT", "-1", "DATAHOARD_HDFS_REQUEST_TIMEOUT='-1': Input should be greater than 0"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_variable(name, value, message):
    with pytest.raises(SourceError, match="^bad worker setting: " + message.replace("(", r"\(")):
        open_source("s3://bucket/prefix/", env={name: value})


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(SourceError) as info:
        SourceSettings.from_env({"DATAHOARD_S3_MAX_ATTEMPTS": "many",
                                 "DATAHOARD_HDFS_REQUEST_TIMEOUT": "soon"})
    text = str(info.value)
    assert "DATAHOARD_S3_MAX_ATTEMPTS='many'" in text and "DATAHOARD_HDFS_REQUEST_TIMEOUT='soon'" in text


def test_secret_mode_needs_both_keys():
    with pytest.raises(SourceAuthError, match="DATAHOARD_SOURCE_CREDENTIALS=secret but AWS_ACCESS_KEY_ID"):
        open_source("s3://bucket/", env={"DATAHOARD_SOURCE_CREDENTIALS": "secret",
                                         "AWS_ACCESS_KEY_ID": "AKID"})


def test_node_identity_is_for_s3_only():
    with pytest.raises(SourceError, match="node-identity applies to s3:// sources, not 'hdfs://nn/x'"):
        open_source("hdfs://nn/x", env={"DATAHOARD_SOURCE_CREDENTIALS": "node-identity"})


def test_the_scheme_picks_the_source():
    assert isinstance(open_source("webhdfs://nn:9870/x", env={}), HdfsSource)
    assert isinstance(open_source("s3://bucket/x", endpoint_url="http://127.0.0.1:1", env={}), S3Source)
    with pytest.raises(SourceError, match="unsupported source 'gs://b/x'"):
        open_source("gs://b/x", env={})


def test_snapshot_variables():
    sid = "ab" * 32
    got = SourceSettings.from_env({"DATAHOARD_SNAPSHOT_ID": sid,
                                   "DATAHOARD_SNAPSHOT_FROM": "http://10.0.0.1:9470, http://[fd00::1]:9470,"})
    assert got.snapshot_id == sid and got.snapshot_from == ("http://10.0.0.1:9470", "http://[fd00::1]:9470")
    assert SourceSettings.from_env({"DATAHOARD_SNAPSHOT_ID": "", "DATAHOARD_SNAPSHOT_FROM": ""}).snapshot_id is None
    with pytest.raises(SourceError, match=r"DATAHOARD_SNAPSHOT_ID='abc': String should match pattern"):
        SourceSettings.from_env({"DATAHOARD_SNAPSHOT_ID": "abc"})
    with pytest.raises(SourceError, match=r"DATAHOARD_SNAPSHOT_FROM=.*'ftp://x' is not an http\(s\):// URL"):
        SourceSettings.from_env({"DATAHOARD_SNAPSHOT_FROM": "ftp://x"})
