"""What S3 says about an object's content, and checking bytes against it.

:func:`evidence` finds the strongest whole-object check S3 offers (the cache verifies every
object whole against it before serving it, verify.py); the helpers check a whole-object GET
against the checksum S3 sent with it. S3 ETags are the content's MD5 only for single-part
objects that are not SSE-KMS / SSE-C; multipart ETags and COMPOSITE checksums need the part
layout.
"""

from __future__ import annotations

import re

from .integrity import S3_ALGORITHMS, Check, Evidence, verify
from .s3_list import Call
from .source import ChecksumMismatch, RemoteObject, SourceChanged

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
#: Beyond this many parts a guessed layout that did not match is not looked up part by part.
_EXACT_PARTS_MAX = 1000


def evidence(call: Call, bucket: str, key: str, obj: RemoteObject, exact: bool,
             where: str) -> Evidence:
    """The strongest whole-object check S3 offers for ``obj``, from one HEAD (two for a
    multipart object; one per part with ``exact``), in this order:

    1. the ETag, when it is the content's MD5 (single-part, not SSE-KMS / SSE-C);
    2. a FULL_OBJECT additional checksum (CRC32C, CRC32, SHA-256, SHA-1, CRC64NVME with the
       AWS CRT installed);
    3. the multipart ETag (not SSE-KMS / SSE-C), recomputed from the part layout: part 1's
       size and the part count from ``HEAD ?partNumber=1`` (``x-amz-mp-parts-count``),
       every part that size but the last (what every uploader we know does); ``exact``
       asks each part's size instead;
    4. a COMPOSITE additional checksum, recomputed from the same part layout.
    """
    head = call("HEAD of", where, "head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED",
                **_version_of(obj))
    etag = head.get("ETag", "").strip('"')
    if obj.etag and etag != obj.etag:
        raise SourceChanged(f"{where} changed since it was listed; remount with --refresh")
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm"))
    if not encrypted and _MD5_ETAG.match(etag):
        return Evidence(Check("md5", etag, "the MD5 ETag"))
    checksums = checksum_fields(head)
    ctype = checksums.get("type", "")
    multipart = re.fullmatch(r"[0-9a-f]{32}-([0-9]+)", etag)
    # A checksum without a type is FULL_OBJECT on a single-part object; on a multipart one
    # it is ambiguous (moto's HEAD sends no type), so only a stated type is trusted there.
    full = ctype == "FULL_OBJECT" or (not ctype and not multipart)
    for algorithm in S3_ALGORITHMS:
        value = checksums.get(algorithm)
        if value and "-" not in value and full:
            return Evidence(Check(algorithm, value, f"its FULL_OBJECT {algorithm.upper()} checksum"))
    composite = next(((a, v) for a in S3_ALGORITHMS if (v := checksums.get(a))
                      and (ctype == "COMPOSITE" or "-" in v)), None)
    if not multipart:
        return Evidence(None, "SSE-KMS/SSE-C object without an S3 checksum" if encrypted
                        else f"ETag {etag!r} is not an MD5 and there is no S3 checksum")
    if encrypted and composite is None:
        return Evidence(None, "multipart SSE-KMS/SSE-C object without an S3 checksum")
    parts, guessed = _part_sizes(call, bucket, key, obj, int(multipart.group(1)), exact, where)
    if parts is None:
        return Evidence(None, "its part layout could not be found")
    if not encrypted:
        return Evidence(Check("md5-parts", etag, f"its multipart ETag ({len(parts)} parts)",
                              parts=parts, guessed=guessed))
    algorithm, value = composite
    return Evidence(Check(f"composite-{algorithm}", value.partition("-")[0],
                          f"its COMPOSITE {algorithm.upper()} checksum ({len(parts)} parts)",
                          parts=parts, guessed=guessed))


def _part_sizes(call: Call, bucket: str, key: str, obj: RemoteObject, count: int, exact: bool,
                where: str) -> tuple[tuple[int, ...] | None, bool]:
    """(part sizes, guessed) of a multipart object of ``count`` parts, or (None, _)."""
    def part_size(number: int) -> tuple[int, int]:
        head = call("HEAD of", where, "head_object", Bucket=bucket, Key=key, PartNumber=number,
                    **_version_of(obj))
        return int(head["ContentLength"]), int(head.get("PartsCount") or count)

    first, count = part_size(1)
    if count < 1 or first <= 0:
        return None, False
    if not exact:
        last = obj.size - (count - 1) * first
        if 0 < last <= first:
            return (first,) * (count - 1) + (last,), True
    if count > _EXACT_PARTS_MAX:
        return None, False
    sizes = (first,) + tuple(part_size(n)[0] for n in range(2, count + 1))
    return (sizes, False) if sum(sizes) == obj.size else (None, False)


def _version_of(obj: RemoteObject) -> dict[str, str]:
    return {"VersionId": obj.version} if obj.version else {}


def checksum_headers(headers) -> dict[str, str]:
    """``{algorithm: value}`` of the ``x-amz-checksum-<algorithm>`` response headers, plus
    ``type`` from ``x-amz-checksum-type``."""
    found = {a: headers.get(f"x-amz-checksum-{a}") for a in (*S3_ALGORITHMS, "type")}
    return {a: v for a, v in found.items() if v}


def checksum_fields(response) -> dict[str, str]:
    """The same from botocore's parsed response (``ChecksumCRC32C``, ``ChecksumType``...)."""
    found = {a: response.get(f"Checksum{a.upper()}") for a in S3_ALGORITHMS}
    found["type"] = response.get("ChecksumType")
    return {a: str(v) for a, v in found.items() if v}


def check_full_checksum(data: bytes, checksums: dict[str, str], where: str) -> bool:
    """True when a FULL_OBJECT checksum of the response matches ``data``; raises on a mismatch
    (retried); False when there is none we can recompute (COMPOSITE values, ``-n``, need the
    part layout: the cache checks those through ``evidence``)."""
    if checksums.get("type", "FULL_OBJECT") != "FULL_OBJECT":
        return False
    for algorithm in S3_ALGORITHMS:
        value = checksums.get(algorithm)
        if value and "-" not in value:
            if not verify(Check(algorithm, value, algorithm), len(data), (data,)):
                raise ChecksumMismatch(
                    f"checksum mismatch reading {where}: {algorithm.upper()} is not {value}")
            return True
    return False


def is_md5_etag(etag: str, response, lower: bool = False) -> bool:
    """S3 ETags are the content MD5 only for single-part, non-KMS, non-SSE-C objects.

    ``response`` is botocore's parsed response, or (``lower``) the raw HTTP headers."""
    if not _MD5_ETAG.match(etag):
        return False
    if lower:
        sse = response.get("x-amz-server-side-encryption", "")
        sse_c = response.get("x-amz-server-side-encryption-customer-algorithm")
    else:
        sse = response.get("ServerSideEncryption", "")
        sse_c = response.get("SSECustomerAlgorithm")
    if sse.startswith("aws:kms") or sse_c:
        return False
    return True
