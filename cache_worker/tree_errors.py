"""Why a direct tree cannot be built or kept, in one line a person can act on."""

from __future__ import annotations

from .keys import shown


class TreeError(Exception):
    """The tree cannot be built or kept; the message says why (shown in stats and status)."""


def _os_error(exc: OSError) -> str:
    """An OSError in one readable line (its file name can be a path of several KiB)."""
    where = f": {shown(exc.filename)}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
