"""What the chunk store raises to its callers."""

from __future__ import annotations


class CacheFull(Exception):
    """The chunk cannot be stored: larger than the capacity, or the disk is full."""


class CorruptChunk(Exception):
    """A chunk file failed its check; it has been dropped and must be refetched."""
