"""The interface every remote store implements, and the errors it may raise.

Kept deliberately small (list, stat, read a range) so HDFS and other stores plug in without the
cache knowing which one it talks to. Errors are classified once, here, into the few kinds the
rest of the worker acts on differently: a permanent problem the user must fix (bad bucket,
credentials, permissions), a transient one worth retrying, and an object that changed under us.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .integrity import Evidence


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object as listed: ``key`` is relative to the source prefix."""

    key: str
    size: int
    etag: str
    mtime: float
    #: The version listed, where reads can ask for it: an S3 versionId from a versioned bucket
    #: (reads then get exactly that version, even after the key is overwritten); "" otherwise
    #: (reads are pinned by ETag only; HDFS's ETag already is its version string).
    version: str = ""


@dataclass(frozen=True, slots=True)
class Fetched:
    """Bytes of a range, and whether the store's own checksum over exactly them matched in the
    same response (S3: a whole-object GET's MD5 ETag or FULL_OBJECT checksum)."""

    data: bytes
    verified: bool


class SourceError(Exception):
    """A failure talking to the source; the message is meant for a person."""


class SourceNotFound(SourceError):
    """The bucket, prefix or object does not exist."""


class SourcePermissionDenied(SourceError):
    """Credentials were accepted but do not allow this access."""


class SourceAuthError(SourceError):
    """Credentials are missing, malformed or rejected."""


class SourceUnreachable(SourceError):
    """The endpoint could not be reached (DNS, refused connection, timeouts) after retries."""


class SourceChanged(SourceError):
    """The object no longer matches the listing (different ETag or size): refresh the index."""


class SourceTransientError(SourceError):
    """A transient failure (throttling, 5xx, reset connection) that outlived the retries."""


class ChecksumMismatch(SourceTransientError):
    """The bytes did not match the checksum the store sent with them: corrupted in transit."""


class Source(ABC):
    """A remote store holding one dataset, addressed by keys relative to its root."""

    #: Printable identity of the dataset, e.g. ``s3://bucket/prefix/``.
    uri: str
    #: Told about every response whose bytes failed the store's checksum (then retried), so
    #: the worker's counters show corruption that the retries hid.
    on_mismatch: Callable[[str], None] | None = None

    @abstractmethod
    def list(self) -> Iterator[RemoteObject]:
        """Every object under the root, in any order. Raises SourceError."""

    @abstractmethod
    def stat(self, key: str) -> RemoteObject:
        """One object's current metadata. Raises SourceNotFound if it is gone."""

    @abstractmethod
    def read(self, obj: RemoteObject, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``obj`` from ``start``.

        Implementations must return the bytes of the *listed* version of the object (e.g. with
        a conditional request on its ETag) and raise SourceChanged otherwise, so the cache never
        mixes two versions of one object; they verify whatever checksum comes with the response
        (S3: the MD5 ETag or checksum of a whole-object read) and retry transient failures
        themselves. Everything else is checked through :meth:`evidence`.
        """

    def fetch(self, obj: RemoteObject, start: int, length: int) -> Fetched:
        """:meth:`read`, saying whether the response itself vouched for the bytes.

        Bytes not vouched for in-band are checked by the cache against :meth:`evidence`
        before anyone sees them (see ``DatasetCache``)."""
        return Fetched(self.read(obj, start, length), False)

    def evidence(self, obj: RemoteObject, exact: bool = False) -> Evidence:
        """What the store vouches for over the whole of ``obj`` (one or two metadata calls).

        ``exact``: a guessed part layout did not match; find the real one (costlier). Raises
        SourceChanged if the object is no longer the listed version."""
        return Evidence(None, "this store offers no checksum")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
