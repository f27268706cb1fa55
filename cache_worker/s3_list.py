"""Listing an S3 prefix: ListObjectsV2, or ListObjectVersions when the bucket keeps versions.

Each page (each of its attempts) is one call through the Source's ``call`` (:meth:`.s3.S3Source._call`),
so it is retried by the one policy and bounded by the request deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from .source import (
    RemoteObject,
    SourceAuthError,
    SourceError,
    SourceNotFound,
    SourcePermissionDenied,
)

log = logging.getLogger(__name__)

#: ``call(doing, what, operation, **kwargs)``: one botocore operation, retried, classified.
Call = Callable[..., dict]


def list_prefix(call: Call, bucket: str, prefix: str, where: str) -> Iterator[RemoteObject]:
    """Every current object, with its versionId when the bucket keeps versions.

    A versioned bucket (versioning Enabled or Suspended) is listed with ListObjectVersions,
    keeping the latest version of each key that is not deleted: reads then ask for that
    version, so an object overwritten after the listing is still served as listed. Without
    permission to ask (``s3:GetBucketVersioning``, ``s3:ListBucketVersions``) or versions,
    it is ListObjectsV2 and reads are pinned by ETag only."""
    if _versioned(call, bucket, where):
        yield from _list_versions(call, bucket, prefix, where)
    else:
        yield from _list_objects(call, bucket, prefix, where)


def _versioned(call: Call, bucket: str, where: str) -> bool:
    try:
        answer = call("asking whether versions are kept for", where, "get_bucket_versioning",
                      Bucket=bucket)
    except (SourcePermissionDenied, SourceAuthError, SourceNotFound) as exc:
        log.info("listing %s without versions: %s", where, exc)
        return False
    except SourceError as exc:
        if "NotImplemented" in str(exc) or "MethodNotAllowed" in str(exc):
            return False
        raise
    return answer.get("Status") in ("Enabled", "Suspended")


def _list_objects(call: Call, bucket: str, prefix: str, where: str) -> Iterator[RemoteObject]:
    """ListObjectsV2 page by page, each page (each of its attempts) within the deadline."""
    token: str | None = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = call("listing", where, "list_objects_v2", **kwargs)
        for item in page.get("Contents", ()):
            yield RemoteObject(
                key=item["Key"][len(prefix) :],
                size=int(item["Size"]),
                etag=item.get("ETag", "").strip('"'),
                mtime=item["LastModified"].timestamp(),
            )
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _list_versions(call: Call, bucket: str, prefix: str, where: str) -> Iterator[RemoteObject]:
    """ListObjectVersions page by page: the latest version of every key (a key whose latest
    version is a delete marker is deleted). Version "null" (written while versioning was
    off or suspended) cannot be told from a later overwrite of it: read by ETag only."""
    markers: dict[str, str] = {}
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, **markers}
        page = call("listing", where, "list_object_versions", **kwargs)
        for item in page.get("Versions", ()):
            if not item.get("IsLatest"):
                continue
            version = item.get("VersionId") or ""
            yield RemoteObject(
                key=item["Key"][len(prefix) :],
                size=int(item["Size"]),
                etag=item.get("ETag", "").strip('"'),
                mtime=item["LastModified"].timestamp(),
                version="" if version == "null" else version,
            )
        if not page.get("IsTruncated"):
            return
        markers = {"KeyMarker": page.get("NextKeyMarker", "")}
        if page.get("NextVersionIdMarker"):
            markers["VersionIdMarker"] = page["NextVersionIdMarker"]
