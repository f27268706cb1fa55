"""The botocore client and the lean GET path that an :class:`S3Options` describes: credentials
(explicit, the default chain, or anonymous), addressing, timeouts, and the deadline every
botocore request runs under.

botocore's own retries are off (``total_max_attempts=1``): the one retry loop is
:class:`.s3.S3Source`'s policy, so the attempts a person sets are the requests the store sees.
An HTTP proxy configured for the endpoint, which only botocore honours, or
``DATAHOARD_S3_CLIENT=botocore``, leaves chunk GETs on botocore (no lean getter).
"""

from __future__ import annotations

import logging
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.httpsession
import botocore.session
from botocore import UNSIGNED
from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)

from . import deadline, s3_get
from .source import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    #: Unsigned requests and no credential lookup at all: not the environment, not
    #: ~/.aws, not instance metadata or a web identity (a Dataset's ``credentials: Anonymous``).
    anonymous: bool = False
    #: Attempts per request in all (the one retry loop is :mod:`.retry`'s; botocore's is off).
    max_attempts: int = 5
    #: Seconds after a request's first attempt past which no new attempt starts.
    retry_deadline: float | None = 300.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    #: Seconds one attempt of one request may take in all (connect, headers, whole body): an
    #: 8 MiB chunk in 60 s needs 140 KB/s from the store.
    request_timeout: float = 60.0
    max_connections: int = 64
    #: ``lean``: chunk GETs through :mod:`.s3_get`; ``botocore``: through botocore (the escape
    #: hatch, ``DATAHOARD_S3_CLIENT``).
    client: str = "lean"
    #: ``path``, ``virtual`` or ``auto`` (botocore's choice); None: path-style with an
    #: ``endpoint_url`` (every S3-compatible store takes it), else auto.
    addressing_style: str | None = None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``.

    A prefix always names a directory: ``s3://b/train`` means the keys under ``train/``, not
    every key that starts with ``train`` (``train2/...``), which is what users of s3fs, rclone
    and Fluid expect.
    """
    if not uri.startswith("s3://"):
        raise SourceError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix/)")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{0,254}", bucket):
        raise SourceError(f"invalid bucket name {bucket!r} in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass
class S3Connection:
    client: Any  # botocore's S3 client: listing, HEAD, and GETs when there is no lean getter
    getter: s3_get.ObjectGetter | None  # the lean chunk GET path, when it can reach the store
    endpoint: str  # for messages


def connect(bucket: str, options: S3Options) -> S3Connection:
    """botocore's client for ``bucket`` and, unless botocore must send them, the lean getter."""
    core = botocore.session.get_session()
    session = boto3.session.Session(
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        aws_session_token=options.session_token,
        region_name=options.region,
        botocore_session=core,
    )
    # get_credentials() walks the whole chain, instance metadata included: not when anonymous.
    credentials = None if options.anonymous else session.get_credentials()
    config = botocore.config.Config(
        # Ours retry (S3Source's policy, around every call): botocore's would multiply them.
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        max_pool_connections=options.max_connections,
        # Path-style works with every S3-compatible store (MinIO, Ceph, moto); AWS
        # accepts it too. Virtual-host style is kept for AWS itself.
        s3={"addressing_style": options.addressing_style
            or ("path" if options.endpoint_url else "auto")},
        # The worker checks sizes and MD5s itself; botocore's extra response checksums cost
        # about 0.45 ms of CPU per request (bench/ANALYSIS.md).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # With no credentials anywhere in the chain, read public buckets anonymously.
        signature_version=UNSIGNED if credentials is None else None,
    )
    client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
    _bound_botocore_requests(client)
    endpoint = options.endpoint_url or client.meta.endpoint_url
    getter: s3_get.ObjectGetter | None = None
    lean = options.client != "botocore" and _no_proxy_for(endpoint)
    target = s3_get.resolve(client, bucket) if lean else None
    if target is not None:
        getter = s3_get.ObjectGetter(
            target=target,
            credentials=credentials,  # refreshed per request when refreshable
            max_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            request_timeout=options.request_timeout,
            ca_bundle=core.get_config_variable("ca_bundle")
            or botocore.httpsession.get_cert_path(True),
            # A bucket in another region than configured: AWS names it in its answer.
            target_for_region=None if options.endpoint_url else (
                lambda region: s3_get.resolve(
                    session.client("s3", region_name=region, config=config), bucket)
            ),
        )
    return S3Connection(client, getter, endpoint)


class _BoundedHTTPConnection(deadline.CutOnDeadline, AWSHTTPConnection):
    pass


class _BoundedHTTPSConnection(deadline.CutOnDeadline, AWSHTTPSConnection):
    pass


class _BoundedHTTPConnectionPool(AWSHTTPConnectionPool):
    ConnectionCls = _BoundedHTTPConnection


class _BoundedHTTPSConnectionPool(AWSHTTPSConnectionPool):
    ConnectionCls = _BoundedHTTPSConnection


def _restart_clock(**_) -> None:
    """``before-send``: a request botocore sends again within one call (its S3 region
    redirector, after a 301/400 naming the bucket's region) gets the full time again."""
    limit = deadline.current()
    if limit is not None:
        limit.rearm()


def _bound_botocore_requests(client) -> None:
    """Make botocore's connections cuttable by :mod:`.deadline` (listing, HEAD, fallback GETs).

    botocore has no total-time limit per request and no public way to choose its connection
    classes; its HTTP session keeps them in one dict shared with every pool manager it makes
    (proxies included), filled before any pool exists. If a botocore release moves it, the
    calls keep working with per-``recv`` timeouts only, and the log says so.
    """
    classes = getattr(getattr(client._endpoint, "http_session", None), "_pool_classes_by_scheme", None)
    if not isinstance(classes, dict):
        log.warning("botocore's connection classes are not where expected: S3 listing and HEAD "
                    "have per-read timeouts only, no total deadline")
        return
    classes.update(http=_BoundedHTTPConnectionPool, https=_BoundedHTTPSConnectionPool)
    client.meta.events.register("before-send.s3", _restart_clock)


def _no_proxy_for(endpoint: str) -> bool:
    """Whether the lean path can reach ``endpoint``: not when an HTTP proxy is configured for
    it, which only botocore's session honours."""
    scheme, _, rest = endpoint.partition("://")
    host = rest.split("/", 1)[0]
    proxies = urllib.request.getproxies()
    return not (proxies.get(scheme) and not urllib.request.proxy_bypass(host))
