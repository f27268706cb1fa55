"""Backing files for FUSE passthrough: the chunk store hands the kernel an object's file only once
every chunk of it is here and verified.

**Backing files.** :meth:`ChunkStore.backing_fd` opens an object file for the kernel only when
every chunk of it is recorded and verified. Once all of them were verified, the file's
signature and the machine's boot id are recorded in ``chunks.db`` (``objects.verified``): a new
process trusts that while both match (any write changes the ctime; a reboot, after which the
page cache may have lost unsynced writes, re-verifies), instead of re-reading a 1 GiB shard to
CRC it on its first open. Measured with ``python -m bench.backing_fd`` on the 2-core test
machine at a load average of 9 (best of 30 rounds of 1,000 calls / median round): a repeated
``backing_fd`` of a small cached object costs 2.5-2.6 / 5.5-6 us where the bare ``open`` +
``fstat`` + ``close`` of the same file costs 2.1-2.3 / 3.2-3.3 us, so about 0.4 us over the
open itself (paths are built as strings: a ``pathlib.Path`` alone costs 7 us, more than the
open); through ``DatasetCache.backing_fd`` (object id hashed from key, ETag and size) 3.9-4.1 /
7-8 us. The first ``backing_fd`` of a 1 GiB object (128 chunks) in a new process takes
0.3-0.7 ms with the recorded verification and 0.9-2.5 s without it (page cache warm: the CRC of
every chunk; more from a cold disk).
"""

from __future__ import annotations

import os
import sqlite3

from .store_layout import ChunkId
from .store_trust import Signature, Trust as _Trust
from .store_trust import signature as _signature


class StoreBacking:
    """Backing descriptors.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

    def backing_fd(self, object_id: str, chunks: list[ChunkId]) -> int | None:
        """An ``O_RDONLY | O_CLOEXEC`` descriptor of the object's file if every one of
        ``chunks`` (all of the object's) is here and verified, else None (the view then serves
        reads itself). The caller owns the descriptor. See the module docstring for what is
        trusted and what it costs."""
        fd, signature = self._open_backing(object_id)
        if fd is None or signature is None:
            return fd
        try:
            if self._backing_ok(object_id, chunks, fd, signature):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def trusted_backing_fd(self, object_id: str) -> int | None:
        """The hot path of :meth:`backing_fd`: a descriptor only if this process already
        vouched for the whole file as it is now (no record lookup, no list of chunks)."""
        fd, signature = self._open_backing(object_id)
        if fd is not None and signature is not None:
            os.close(fd)
            return None
        return fd

    def still_backing(self, object_id: str, signature: Signature) -> bool:
        """Whether the object's file is still the whole, verified one that had ``signature``
        when it was handed out by :meth:`backing_fd` (a ``stat``, no descriptor, no lock): the
        view's check before it reuses a backing id it kept for that file."""
        trust = self._trust.get(object_id)
        if trust is None or not trust.whole or trust.signature != signature:
            return False
        try:
            return _signature(os.stat(self._file(object_id))) == signature
        except OSError:
            return False

    @staticmethod
    def signature_of(fd: int) -> Signature:
        return _signature(os.fstat(fd))

    def _open_backing(self, object_id: str) -> tuple[int | None, Signature | None]:
        """(fd, None) if the file is open and already vouched for; (fd, its signature) if it
        still has to be checked; (None, None) if it is not here."""
        try:
            fd = os.open(self._file(object_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            signature = _signature(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        trust = self._trust.get(object_id)
        if trust is not None and trust.whole and trust.signature == signature:
            return fd, None
        return fd, signature

    def _backing_ok(self, oid: str, chunks: list[ChunkId], fd: int, signature: Signature) -> bool:
        with self._lock:
            rows = {name: (pos, size) for name, size, pos in self._rows_of_locked(oid) if name not in self._gone}
            verified = self._query("SELECT verified FROM objects WHERE oid = ?", (oid,))
        if not chunks or any(c.name not in rows for c in chunks):
            return False
        mark = f"{signature:x}:{self._boot}"
        if verified is not None and verified[0] == mark and self._boot:
            trust = self._trust.get(oid)
            if trust is None or trust.signature != signature:
                trust = self._trust[oid] = _Trust(signature)
            for c in chunks:
                trust.add(c.index, rows[c.name])
            trust.whole = True
            return True
        for c in chunks:
            trust = self._trust.get(oid)
            if trust is not None and trust.signature == signature and trust.has(c.index):
                continue
            if self._check(c.name, fd, signature) is None:
                return False
        trust = self._trust.get(oid)
        if trust is None or trust.signature != signature or not all(trust.has(c.index) for c in chunks):
            return False  # changed while we checked it: the next open checks again
        trust.whole = True
        if not self._read_through:
            with self._lock:
                try:
                    self._db.execute("UPDATE objects SET verified = ? WHERE oid = ?", (mark, oid))
                except sqlite3.Error as exc:  # only a saving: the next process checks again
                    self._write_failed("recording an object's verification", exc)
        return True
