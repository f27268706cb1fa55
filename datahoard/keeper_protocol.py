"""The FUSE keeper's protocol (:mod:`fuse_keeper`): the messages, their limits and the errors
a client sees. The worker (through :mod:`keeper_client`) and the keeper (hosted by the CSI node
plugin or the standalone supervisor) both import this: it is their whole contract.

Protocol: one JSON document per ``SOCK_SEQPACKET`` message (so no framing, and a message and
its descriptor arrive together), a request answered by exactly one reply:

* ``deposit`` (mountpoint, state, + the descriptor) -> ``ok`` | ``refused`` | ``error``
* ``claim`` (mountpoint) -> ``ok`` (state, + a descriptor) | ``none`` | ``refused``
* ``release`` (mountpoint) -> ``ok`` | ``none`` | ``refused``
* ``list`` -> ``ok`` (entries), for ``datahoard status``

``state`` is whatever the FUSE layer needs to resume without an INIT (negotiated protocol
version, flags, max_write...); the keeper keeps it opaque, bounded by the message size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Largest message either side sends or accepts (the INIT state is a few hundred bytes).
MAX_MESSAGE = 64 * 1024
#: Seconds a client waits for the keeper's answer (and to connect).
CLIENT_TIMEOUT = 5.0

class KeeperError(Exception):
    """The keeper answered with an error, or the exchange failed; the message says which."""


class KeeperUnavailable(KeeperError):
    """No keeper runs at the socket (or we may not talk to it): the worker then falls back to
    mounting fresh, and the CSI plugin repairs the binds, as before the keeper existed."""


class KeeperRefused(KeeperError):
    """Another live worker holds the mountpoint's connection; ``pid`` is that worker."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


# -- wire format (pydantic: this is an edge, any local process of the right uid may write it) --
class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["deposit", "claim", "release", "list"]
    mountpoint: str | None = Field(default=None, max_length=4096)
    state: dict[str, Any] | None = None


class EntryInfo(BaseModel):
    """One held connection, as ``list`` reports it."""

    mountpoint: str
    connection: int | None
    #: The pid serving it now (the lease holder), or None while no worker does.
    served_by: int | None
    held_seconds: float
    #: Seconds since the last worker let go, while unclaimed.
    unclaimed_seconds: float | None = None


class Reply(BaseModel):
    status: Literal["ok", "none", "refused", "error"]
    message: str = ""
    pid: int | None = None
    state: dict[str, Any] | None = None
    entries: list[EntryInfo] | None = None


@dataclass(frozen=True)
class Claimed:
    """A claimed connection: ``fd`` is ours to serve (and to close); ``state`` as deposited."""

    fd: int
    state: dict[str, Any]
