"""Checks a store vouches for, and recomputing them over bytes we fetched.

A cache that keeps what arrived keeps whatever a proxy, a NIC or a buggy middlebox did to it,
for good: the chunk CRC in :mod:`.store` only protects the bytes *after* they reached us. So
every object is checked, before its bytes are served or stored, against a value the store
computed when the object was written (:class:`Check`): S3's MD5 ETag, its additional
checksums (``x-amz-checksum-*``, FULL_OBJECT or COMPOSITE), the multipart ETag recomputed from
the part layout, or HDFS's ``GETFILECHECKSUM`` (MD5 of per-block MD5s of per-512-byte CRCs).

All of these are whole-object values: S3 returns no checksum for a ranged GET and HDFS none for
a range, so a range of a large object can only be vouched for by checking the whole object.
:class:`Digest` therefore consumes an object's bytes in order, chunk by chunk, and never needs
them in memory at once.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import crc32c as _crc32c

try:  # CRC64NVME needs the AWS CRT; without it such a checksum is not something we can check.
    from awscrt import checksums as _crt  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _crt = None

#: Additional-checksum algorithms we can recompute, in the order we prefer them.
S3_ALGORITHMS: tuple[str, ...] = ("crc32c", "crc32", "sha256", "sha1") + (
    ("crc64nvme",) if _crt is not None else ())


class _Crc:
    """A running CRC with the hashlib ``update``/``digest`` shape (big-endian, as S3 sends it)."""

    def __init__(self, fn: Callable[[bytes, int], int], width: int) -> None:
        self._fn, self._width, self._value = fn, width, 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


def _crc32c_update(data: bytes, value: int) -> int:
    return _crc32c.crc32c(data, value)


def _hasher(algorithm: str):
    """A fresh running digest of ``algorithm`` (S3 checksum names, lower case, or md5)."""
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algorithm in ("sha1", "sha256"):
        return hashlib.new(algorithm)
    if algorithm == "crc32":
        return _Crc(zlib.crc32, 4)
    if algorithm == "crc32c":
        return _Crc(_crc32c_update, 4)
    if algorithm == "crc64nvme" and _crt is not None:
        return _Crc(lambda data, value: _crt.crc64nvme(data, value), 8)
    raise ValueError(f"no implementation of checksum {algorithm!r}")


@dataclass(frozen=True)
class Check:
    """One value the store vouches for over a whole object, and how to recompute it.

    ``kind``:
      * ``md5``, ``crc32``, ``crc32c``, ``sha1``, ``sha256``, ``crc64nvme``: that digest of the
        object's bytes; ``expected`` is hex for md5, base64 (as S3 sends it) otherwise.
      * ``md5-parts``: a multipart ETag, ``md5(md5(part 1) || ... || md5(part n))-n`` (hex).
      * ``composite-<algorithm>``: a COMPOSITE additional checksum, ``algorithm`` over the
        concatenated per-part checksums, base64 (the ``-n`` suffix stripped).
      * ``hdfs-md5md5crc32c`` / ``hdfs-md5md5crc32``: HDFS's MD5MD5CRC file checksum; ``expected``
        is the MD5's hex, ``block_size`` and ``bytes_per_crc`` describe the layout.

    ``parts`` are the part sizes for the ``*-parts`` and ``composite-*`` kinds; ``guessed``
    says they were inferred (every part the size of part 1 but the last), so a mismatch must be
    rechecked against the exact sizes before it is called corruption.
    """

    kind: str
    expected: str
    label: str
    parts: tuple[int, ...] = ()
    guessed: bool = False
    block_size: int = 0
    bytes_per_crc: int = 0


@dataclass(frozen=True)
class Evidence:
    """What can vouch for one object: a check, or the reason there is none."""

    check: Check | None
    reason: str = ""


class Digest:
    """Recompute a :class:`Check` over an object's bytes fed in order; :meth:`matches` at the end."""

    def __init__(self, check: Check, size: int) -> None:
        self.check = check
        self._size = size
        kind = check.kind
        if kind == "md5-parts" or kind.startswith("composite-"):
            inner = "md5" if kind == "md5-parts" else kind.removeprefix("composite-")
            self._segments = _Segments(check.parts, lambda: _hasher(inner))
        elif kind.startswith("hdfs-md5md5"):
            crc = zlib.crc32 if kind == "hdfs-md5md5crc32" else _crc32c_update
            block_size, per_crc = check.block_size, check.bytes_per_crc
            blocks = [min(block_size, size - at) for at in range(0, size, block_size)] or [0]
            self._segments = _Segments(tuple(blocks), lambda: _HdfsBlock(crc, per_crc))
        else:
            self._segments = None
            self._hash = _hasher(kind)
        self._fed = 0

    def update(self, data: bytes) -> None:
        self._fed += len(data)
        if self._segments is not None:
            self._segments.update(data)
        else:
            self._hash.update(data)

    def value(self) -> str:
        """The recomputed value, in the notation of ``check.expected``."""
        kind = self.check.kind
        if self._segments is None:
            raw = self._hash.digest()
            return raw.hex() if kind == "md5" else base64.b64encode(raw).decode()
        digests = self._segments.digests()
        if kind == "md5-parts":
            return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"
        if kind.startswith("composite-"):
            outer = _hasher(kind.removeprefix("composite-"))
            outer.update(b"".join(digests))
            return base64.b64encode(outer.digest()).decode()
        return hashlib.md5(_hadoop_buffer(b"".join(digests)), usedforsecurity=False).hexdigest()

    def matches(self) -> bool:
        if self._fed != self._size:
            return False
        if self.check.kind.startswith("hdfs-") and self._segments is not None:
            # Hadoop digests its buffer, zero padding included (see _hadoop_buffer); should a
            # version digest only what it wrote, that value vouches for the bytes just as well.
            exact = hashlib.md5(b"".join(self._segments.digests()), usedforsecurity=False).hexdigest()
            if exact == self.check.expected:
                return True
        return self.value() == self.check.expected


def verify(check: Check, size: int, pieces: Iterable[bytes]) -> bool:
    """Whether ``pieces`` (the object's bytes, in order) are what ``check`` vouches for."""
    digest = Digest(check, size)
    for piece in pieces:
        digest.update(piece)
    return digest.matches()


class _Segments:
    """One running digest per consecutive segment (S3 part, HDFS block) of given sizes."""

    def __init__(self, sizes: tuple[int, ...], factory: Callable[[], object]) -> None:
        self._sizes = sizes
        self._factory = factory
        self._done: list[bytes] = []
        self._index = 0
        self._left = sizes[0] if sizes else 0
        self._current = factory()

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                if self._index + 1 >= len(self._sizes):
                    self._index = len(self._sizes)  # more bytes than the layout: never matches
                    self._done.append(b"overflow")
                    return
                self._done.append(self._current.digest())
                self._index += 1
                self._left = self._sizes[self._index]
                self._current = self._factory()
            take = min(self._left, len(view))
            self._current.update(view[:take])
            self._left -= take
            view = view[take:]

    def digests(self) -> list[bytes]:
        return [*self._done, self._current.digest()]


class _HdfsBlock:
    """MD5 over the big-endian CRCs of each ``per_crc`` bytes of one HDFS block (its .meta file)."""

    def __init__(self, crc: Callable[[bytes, int], int], per_crc: int) -> None:
        self._crc, self._per_crc = crc, per_crc
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._partial = b""

    def update(self, data) -> None:
        data = self._partial + bytes(data)
        full = len(data) - len(data) % self._per_crc
        crcs = [self._crc(data[at : at + self._per_crc], 0) for at in range(0, full, self._per_crc)]
        if crcs:
            self._md5.update(struct.pack(f">{len(crcs)}I", *crcs))
        self._partial = data[full:]

    def digest(self) -> bytes:
        if self._partial:
            self._md5.update(struct.pack(">I", self._crc(self._partial, 0)))
            self._partial = b""
        return self._md5.digest()


def _hadoop_buffer(data: bytes) -> bytes:
    """``data`` as Hadoop's ``DataOutputBuffer.getData()`` returns it: the whole backing array,
    32 bytes at first and doubled when a 16-byte block MD5 does not fit, zero-padded. The HDFS
    client computes the file MD5 over that array, so a file of one block (16 bytes of block MD5)
    hashes 16 more zero bytes, one of 21 blocks 176 more."""
    capacity = 32
    while capacity < len(data):
        capacity *= 2
    return data + bytes(capacity - len(data))


def parse_hdfs_checksum(doc: dict) -> tuple[str, int, str] | None:
    """``(kind, bytes_per_crc, md5 hex)`` of a WebHDFS ``GETFILECHECKSUM`` answer, or None when
    it is not an MD5-of-MD5-of-CRC checksum (a COMPOSITE-CRC cluster setting, say)."""
    checksum = doc.get("FileChecksum") or {}
    algorithm = str(checksum.get("algorithm", ""))
    try:  # ``bytes`` may carry the padding of Hadoop's buffer past ``length``
        raw = bytes.fromhex(str(checksum.get("bytes", "")))[: int(checksum.get("length", 0))]
    except ValueError:
        return None
    if not algorithm.startswith("MD5-of-") or len(raw) != 28:
        return None
    if algorithm.endswith("CRC32C"):
        kind = "hdfs-md5md5crc32c"
    elif algorithm.endswith("CRC32"):
        kind = "hdfs-md5md5crc32"
    else:
        return None
    bytes_per_crc = struct.unpack(">i", raw[:4])[0]
    return kind, bytes_per_crc, raw[12:].hex()
