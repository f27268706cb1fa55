"""Pick a Source implementation from a URI scheme."""

from __future__ import annotations

from . import hdfs
from .s3 import S3Options, S3Source
from .source import Source, SourceError

SCHEMES = ("s3", *hdfs.SCHEMES)


def open_source(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Source:
    """A Source for ``uri``; credentials come from the environment (the usual AWS chain).

    ``DATAHOARD_S3_MAX_ATTEMPTS`` bounds retries per request (default 5). HDFS (WebHDFS) reads
    ``DATAHOARD_HDFS_*`` (see :func:`hdfs.options_from_env`).
    """
    import os

    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme == "s3":
        attempts = int(os.environ.get("DATAHOARD_S3_MAX_ATTEMPTS", "5"))
        return S3Source(uri, S3Options(endpoint_url=endpoint_url, region=region, max_attempts=attempts))
    if scheme in hdfs.SCHEMES:
        if endpoint_url or region:
            raise SourceError(f"--endpoint-url and --region apply to s3:// sources, not {uri!r}")
        return hdfs.HdfsSource(uri, hdfs.options_from_env(os.environ))
    raise SourceError(
        f"unsupported source {uri!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}"
    )
