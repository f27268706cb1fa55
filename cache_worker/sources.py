"""Pick a Source implementation from a URI scheme, with the settings the environment holds."""

from __future__ import annotations

from collections.abc import Mapping

from . import hdfs, hdfs_uri
from .s3 import S3Options, S3Source
from .settings import SourceSettings
from .source import Source, SourceAuthError, SourceError

SCHEMES = ("s3", *hdfs_uri.SCHEMES)

#: The variable that says how a worker authenticates (see :data:`.settings.CredentialsMode`).
CREDENTIALS_ENV = "DATAHOARD_SOURCE_CREDENTIALS"


def s3_options(settings: SourceSettings, endpoint_url: str | None, region: str | None) -> S3Options:
    keys: dict[str, str | None] = {}
    if settings.source_credentials == "secret":
        access, secret = settings.aws_access_key_id, settings.aws_secret_access_key
        if not access or secret is None:
            raise SourceAuthError(f"{CREDENTIALS_ENV}=secret but AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY are not both set")
        # Explicit keys: boto3 then never walks the chain (no metadata, no web identity).
        token = settings.aws_session_token
        keys = {"access_key": access, "secret_key": secret.get_secret_value(),
                "session_token": token.get_secret_value() if token else None}
    return S3Options(
        endpoint_url=endpoint_url,
        region=region,
        anonymous=settings.source_credentials == "anonymous",
        max_attempts=settings.s3_max_attempts,
        retry_deadline=settings.s3_retry_deadline,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        request_timeout=settings.s3_request_timeout,
        client=settings.s3_client,
        addressing_style=settings.s3_addressing_style,
        **keys,
    )


def hdfs_options(settings: SourceSettings, uri: str = "hdfs://") -> hdfs.HdfsOptions:
    mode = settings.source_credentials
    if mode == "node-identity":
        raise SourceError(f"{CREDENTIALS_ENV}=node-identity applies to s3:// sources, not {uri!r}")
    anonymous = mode == "anonymous"  # no identity, even one that leaked into the environment
    token = None if anonymous else settings.hdfs_delegation_token
    return hdfs.HdfsOptions(
        user=(None if anonymous else settings.hdfs_user) or settings.hadoop_user_name,
        delegation_token=token.get_secret_value() if token else None,
        namenodes=settings.hdfs_namenodes,
        max_attempts=settings.hdfs_max_attempts,
        retry_deadline=settings.hdfs_retry_deadline,
        request_timeout=settings.hdfs_request_timeout,
    )


def open_source(uri: str, endpoint_url: str | None = None, region: str | None = None,
                env: Mapping[str, str] | None = None) -> Source:
    """A Source for ``uri``, configured by ``env`` (default: the process environment) as
    :class:`~.settings.SourceSettings` reads it; a bad value is a SourceError naming it."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise SourceError(
            f"unsupported source {uri!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}")
    settings = SourceSettings.from_env(env)
    if scheme == "s3":
        return S3Source(uri, s3_options(settings, endpoint_url, region))
    if endpoint_url or region:
        raise SourceError(f"--endpoint-url and --region apply to s3:// sources, not {uri!r}")
    return hdfs.HdfsSource(uri, hdfs_options(settings, uri))
