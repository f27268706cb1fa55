"""Reads from the chunk store: a cached chunk's bytes, checked against its CRC when this process
has not vouched for its file as it is now (:mod:`.store_trust`), and safe against a racing
eviction (the epochs of :mod:`.store_evict`).
"""

from __future__ import annotations

import logging
import os
import time
import zlib

from .store_evict import STRIPES as _STRIPES
from .store_layout import ChunkId
from .store_layout import split_name as _split
from .store_trust import Signature, Trust as _Trust
from .store_trust import inode_of as _inode
from .store_trust import signature as _signature

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split

_READ_STEP = 1 << 20
#: Reads that raced an eviction of their range are retried this often before reading through.
_READ_TRIES = 3


class StoreReads:
    """Lookups, reads and checks.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

    def contains(self, chunk: ChunkId) -> bool:
        name = chunk.name
        with self._lock:
            if name in self._gone:
                return False
            row = self._query("SELECT 1 FROM chunks WHERE name = ?", (name,))
        return row is not None

    def _open(self, oid: str) -> int | None:
        try:
            return os.open(self._file(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # not cached, or evicted between a check and this open
            self._trust.pop(oid, None)
            self._forget_missing(oid)
            return None

    def read(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes of a cached chunk, or None if it is not cached (or was found corrupt).

        The chunk's CRC is checked on its first read in this process and again whenever its
        file's signature changed since (:mod:`.store_trust`).

        A chunk of an object not known whole is read under the object's lock, which eviction
        takes to punch chunks out: a read racing a punch could otherwise get the punched zeros
        (the epoch check narrowed that window but a hammering test still found it). A whole
        object is never punched, only unlinked, which an open descriptor survives: its reads
        take no lock.
        """
        trust = self._trust.get(chunk.object_id)
        if trust is not None and trust.whole:
            return self._read_chunk(chunk, offset, length)
        with self._object_lock(chunk.object_id):
            return self._read_chunk(chunk, offset, length)

    def _read_chunk(self, chunk: ChunkId, offset: int, length: int) -> bytes | None:
        oid, index = chunk.object_id, chunk.index
        stripe = hash(oid) % _STRIPES
        for _ in range(_READ_TRIES):
            epoch = self._epochs[stripe]
            if epoch & 1:  # chunks of this stripe are being dropped right now
                time.sleep(0)
                continue
            fd = self._open(oid)
            if fd is None:
                return None
            try:
                signature = _signature(os.fstat(fd))
                trust = self._trust.get(oid)
                where = trust.get(index) if trust is not None and trust.signature == signature else None
                if where is None:
                    where = self._check(chunk.name, fd, signature)
                    if where is None:
                        if self._epochs[stripe] != epoch:
                            continue  # raced an eviction of this object
                        return None
                if chunk.size and where != (chunk.offset, chunk.size):
                    # Cut with another chunk size (a cache from a release with other tuning):
                    # its record's range is not this chunk's, and serving it by name would
                    # give the bytes of that other range. Refetched under today's geometry.
                    log.warning("cached chunk %s covers [%d, %d), not [%d, %d) (cut with another chunk size); "
                                "dropping it and refetching", chunk.name, where[0], where[0] + where[1],
                                chunk.offset, chunk.offset + chunk.size)
                    self.discard(chunk.name)
                    return None
                data = os.pread(fd, min(length, max(0, where[1] - offset)), where[0] + offset)
            finally:
                os.close(fd)
            if self._epochs[stripe] == epoch:
                self._touch(chunk.name)
                return data
        return None  # kept losing a race with eviction: read through

    def verify(self, chunk: ChunkId) -> bool:
        """True if ``chunk`` is cached and matches its CRC (checked once per process, and again
        if its file changed); a chunk that fails is dropped (and reported through
        ``on_discard``)."""
        fd = self._open(chunk.object_id)
        if fd is None:
            return False
        try:
            signature = _signature(os.fstat(fd))
            trust = self._trust.get(chunk.object_id)
            if trust is not None and trust.signature == signature and trust.has(chunk.index):
                return True
            return self._check(chunk.name, fd, signature) is not None
        finally:
            os.close(fd)

    def record(self, name: str) -> tuple[int, int] | None:
        """(size, CRC32) of a cached chunk, or None."""
        with self._lock:
            if name in self._gone:
                return None
            return self._query("SELECT size, crc FROM chunks WHERE name = ?", (name,))

    def _check(self, name: str, fd: int, signature: Signature) -> tuple[int, int] | None:
        """Check one chunk in the open object file against its record; drop it if it does not
        match. Returns (position, size) of the chunk if it matched."""
        with self._lock:
            row = None if name in self._gone else self._query(
                "SELECT size, crc, pos FROM chunks WHERE name = ?", (name,))
        if row is None:
            return None
        size, crc, pos = row
        oid, index = _split(name)
        stripe = hash(oid) % _STRIPES
        epoch = self._epochs[stripe]
        before = self._trust.get(oid)
        actual = done = 0
        while done < size:  # in steps: an 8 MiB chunk need not be in memory twice
            piece = os.pread(fd, min(_READ_STEP, size - done), pos + done)
            if not piece:
                break
            actual = zlib.crc32(piece, actual)
            done += len(piece)
        if done != size or actual != crc:
            if self._epochs[stripe] != epoch or epoch & 1:
                return None  # evicted while we read it: not corrupt, just gone
            changed = before is not None and before.has(index)  # before the drop forgets it
            # Only the file read, not one a fill put there after another reader dropped it.
            if self.discard(name, inode=_inode(signature)):
                log.error("cached chunk %s %s does not match its CRC; dropped it, to be refetched", name,
                          "changed on disk since it was verified and" if changed else "failed verification:")
            return None
        trust = self._trust.get(oid)
        if trust is None or trust.signature != signature:
            trust = self._trust[oid] = _Trust(signature)
        trust.add(index, (pos, size))
        return pos, size

    def _forget_missing(self, oid: str) -> None:
        """An object file is gone (not cached, evicted, or deleted behind our back): make sure
        its records are gone too, or readers would be told it is cached."""
        with self._lock:
            if self._path(oid).exists():
                return
            rows = self._rows_of_locked(oid)
            rows = [r for r in rows if r[0] not in self._gone]
            if not rows:
                return
            log.warning("cached object file %s disappeared from disk; it will be refetched", oid)
            for name, size, _ in rows:
                self._delete_record_locked(name, size)
            self._drop_object_row_locked(oid)
