"""Pick a Source implementation from a URI scheme."""

from __future__ import annotations

from . import hdfs
from .s3 import S3Options, S3Source
from .source import Source, SourceError

SCHEMES = ("s3", *hdfs.SCHEMES)


def open_source(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Source:
    """A Source for ``uri``; credentials come from the environment (the usual AWS chain).

    ``DATAHOARD_S3_MAX_ATTEMPTS`` bounds retries per request (default 5);
    ``DATAHOARD_S3_CONNECT_TIMEOUT`` and ``DATAHOARD_S3_READ_TIMEOUT`` (seconds, default 5 and
    30) bound how long one attempt may wait on a silent store before it is retried, and
    ``DATAHOARD_S3_REQUEST_TIMEOUT`` (default 60) how long one attempt may take in all, so a
    store that drips its answer is cut off too. HDFS (WebHDFS) reads
    ``DATAHOARD_HDFS_*`` (see :func:`hdfs.options_from_env`).
    """
    import os

    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme == "s3":
        env = os.environ
        options = S3Options(
            endpoint_url=endpoint_url,
            region=region,
            max_attempts=int(env.get("DATAHOARD_S3_MAX_ATTEMPTS", "5")),
            connect_timeout=float(env.get("DATAHOARD_S3_CONNECT_TIMEOUT", "5")),
            read_timeout=float(env.get("DATAHOARD_S3_READ_TIMEOUT", "30")),
            request_timeout=float(env.get("DATAHOARD_S3_REQUEST_TIMEOUT", "60")),
        )
        return S3Source(uri, options)
    if scheme in hdfs.SCHEMES:
        if endpoint_url or region:
            raise SourceError(f"--endpoint-url and --region apply to s3:// sources, not {uri!r}")
        return hdfs.HdfsSource(uri, hdfs.options_from_env(os.environ))
    raise SourceError(
        f"unsupported source {uri!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}"
    )
