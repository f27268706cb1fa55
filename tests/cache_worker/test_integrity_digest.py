"""The checksum recomputations of cache_worker/integrity.py, on known values (no server)."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib

import pytest

from datahoard.cache_worker.integrity import Check, _hadoop_buffer, parse_hdfs_checksum, verify


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_crc32c_is_the_castagnoli_polynomial():
    # The check value of CRC-32C (RFC 3720), base64 of its big-endian bytes as S3 sends it.
    expected = base64.b64encode((0xE3069283).to_bytes(4, "big")).decode()
    assert verify(Check("crc32c", expected, "x"), 9, [b"1234", b"56789"])


@pytest.mark.parametrize("piece", [1000, 5 << 20, 7 << 20])
def test_multipart_etag_over_any_chunking(piece):
    part = 5 << 20
    data = os.urandom(2 * part + 12345)
    md5s = b"".join(hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part))
    etag = f"{hashlib.md5(md5s).hexdigest()}-3"
    check = Check("md5-parts", etag, "x", parts=(part, part, 12345))
    assert verify(check, len(data), pieces(data, piece))
    wrong = bytearray(data)
    wrong[part] ^= 1
    assert not verify(check, len(data), pieces(bytes(wrong), piece))
    # A wrong layout (the same total) does not match either.
    assert not verify(Check("md5-parts", etag, "x", parts=(part - 1, part + 1, 12345)), len(data),
                      pieces(data, piece))


def test_composite_checksum_and_a_layout_too_short():
    data = os.urandom(3000)
    crcs = b"".join(zlib.crc32(data[i : i + 1000]).to_bytes(4, "big") for i in range(0, 3000, 1000))
    value = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()
    assert verify(Check("composite-crc32", value, "x", parts=(1000,) * 3), 3000, pieces(data, 700))
    assert not verify(Check("composite-crc32", value, "x", parts=(1000,) * 2), 3000, [data])


def test_hadoop_buffer_doubles_from_32_bytes():
    assert len(_hadoop_buffer(b"x" * 16)) == 32
    assert len(_hadoop_buffer(b"x" * 48)) == 64
    assert len(_hadoop_buffer(b"x" * 336)) == 512
    assert _hadoop_buffer(b"x" * 16).endswith(bytes(16))


def test_parse_hdfs_checksum_ignores_the_buffer_padding():
    md5 = "82304aff59b501c8cdbe4de2969e8622"
    doc = {"FileChecksum": {"algorithm": "MD5-of-2048MD5-of-512CRC32C", "length": 28,
                            "bytes": "0000020000000000000008" "00" + md5 + "00000000"}}
    assert parse_hdfs_checksum(doc) == ("hdfs-md5md5crc32c", 512, md5)
    assert parse_hdfs_checksum({"FileChecksum": {"algorithm": "COMPOSITE-CRC32C", "length": 8,
                                                 "bytes": "00" * 8}}) is None
