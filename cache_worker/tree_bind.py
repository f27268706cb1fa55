"""The direct tree's bind over the worker's mountpoint: finding it and taking it off.

With ``--direct`` the worker binds its ready tree (``tree.py``) read-only on top of its own FUSE
view, so readers of the mountpoint get plain files. A worker that crashed leaves that bind
behind; the next start, ``datahoard umount`` and the worker's own shutdown take it off with
:func:`clear_tree_binds`. A bind is recognised by its mountinfo root (``.../direct/<id>``,
``datahoard.tree_layout``) on a filesystem that is not FUSE.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datahoard import tree_layout
from datahoard.mounts import detach, mounts_at, top_mounts

log = logging.getLogger(__name__)

#: More stacked binds than this on one mountpoint is not a crash leftover: stop and say so.
_MAX_BINDS = 64


def top_is_tree_bind(mountpoint: Path) -> bool:
    """Whether what a lookup of *mountpoint* reaches is a direct tree's bind."""
    top = top_mounts(mounts_at(mountpoint))
    return bool(top) and not top[-1].fstype.startswith("fuse") and tree_layout.tree_id(top[-1].root) is not None


def clear_tree_binds(mountpoint: Path) -> int:
    """Detach direct-tree binds stacked on ``mountpoint`` (left by a crash); returns how many."""
    removed = 0
    try:
        while removed < _MAX_BINDS and top_is_tree_bind(mountpoint):
            detach(mountpoint)
            removed += 1
    except OSError as exc:
        log.warning("cannot remove the direct tree's bind at %s: %s", mountpoint, exc)
    if removed:
        log.info("removed %d direct tree bind(s) from %s", removed, mountpoint)
    return removed
