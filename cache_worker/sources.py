"""Pick a Source implementation from a URI scheme, with the credentials the environment allows."""

from __future__ import annotations

import os
from collections.abc import Mapping

from . import hdfs
from .s3 import S3Options, S3Source
from .source import Source, SourceAuthError, SourceError

SCHEMES = ("s3", *hdfs.SCHEMES)

#: How a worker authenticates (the operator sets it from ``spec.source.credentials``):
#: ``anonymous``: unsigned requests, no credential lookup at all (not even instance metadata);
#: ``secret``: exactly the keys in the environment (from the Dataset's Secret), no chain;
#: ``node-identity``, or unset (a person running ``datahoard mount``): the usual AWS chain.
CREDENTIALS_ENV = "DATAHOARD_SOURCE_CREDENTIALS"
CREDENTIALS_MODES = ("anonymous", "secret", "node-identity")
_HDFS_CREDENTIALS = ("DATAHOARD_HDFS_USER", "DATAHOARD_HDFS_DELEGATION_TOKEN")


def credentials_mode(env: Mapping[str, str]) -> str | None:
    mode = env.get(CREDENTIALS_ENV, "").strip().lower() or None
    if mode is not None and mode not in CREDENTIALS_MODES:
        raise SourceError(f"{CREDENTIALS_ENV}={mode!r} is not one of {', '.join(CREDENTIALS_MODES)}")
    return mode


def _s3_options(env: Mapping[str, str], endpoint_url: str | None, region: str | None) -> S3Options:
    mode = credentials_mode(env)
    keys: dict[str, str | None] = {}
    if mode == "secret":
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise SourceAuthError(f"{CREDENTIALS_ENV}=secret but AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY are not both set")
        # Explicit keys: boto3 then never walks the chain (no metadata, no web identity).
        keys = {"access_key": access, "secret_key": secret,
                "session_token": env.get("AWS_SESSION_TOKEN") or None}
    return S3Options(
        endpoint_url=endpoint_url,
        region=region,
        anonymous=mode == "anonymous",
        max_attempts=int(env.get("DATAHOARD_S3_MAX_ATTEMPTS", "5")),
        connect_timeout=float(env.get("DATAHOARD_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=float(env.get("DATAHOARD_S3_READ_TIMEOUT", "30")),
        request_timeout=float(env.get("DATAHOARD_S3_REQUEST_TIMEOUT", "60")),
        **keys,
    )


def open_source(uri: str, endpoint_url: str | None = None, region: str | None = None,
                env: Mapping[str, str] | None = None) -> Source:
    """A Source for ``uri``; credentials come from ``env`` (default: the process environment)
    as :data:`CREDENTIALS_ENV` says.

    ``DATAHOARD_S3_MAX_ATTEMPTS`` bounds retries per request (default 5);
    ``DATAHOARD_S3_CONNECT_TIMEOUT`` and ``DATAHOARD_S3_READ_TIMEOUT`` (seconds, default 5 and
    30) bound how long one attempt may wait on a silent store before it is retried, and
    ``DATAHOARD_S3_REQUEST_TIMEOUT`` (default 60) how long one attempt may take in all, so a
    store that drips its answer is cut off too. HDFS (WebHDFS) reads
    ``DATAHOARD_HDFS_*`` (see :func:`hdfs.options_from_env`).
    """
    env = os.environ if env is None else env
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme == "s3":
        return S3Source(uri, _s3_options(env, endpoint_url, region))
    if scheme in hdfs.SCHEMES:
        if endpoint_url or region:
            raise SourceError(f"--endpoint-url and --region apply to s3:// sources, not {uri!r}")
        mode = credentials_mode(env)
        if mode == "node-identity":
            raise SourceError(f"{CREDENTIALS_ENV}=node-identity applies to s3:// sources, not {uri!r}")
        if mode == "anonymous":
            # Anonymous means no identity, even one that leaked into the environment.
            env = {k: v for k, v in env.items() if k not in _HDFS_CREDENTIALS}
        return hdfs.HdfsSource(uri, hdfs.options_from_env(env))
    raise SourceError(
        f"unsupported source {uri!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}"
    )
