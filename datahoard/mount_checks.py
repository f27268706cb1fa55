"""Checks on a ``datahoard mount`` command line, run before anything is touched.

Each of these once failed late and badly: a traceback, a bare ``RuntimeError: 4`` from libfuse,
a password in ``ps`` and in ``/stats``, or a mount that deadlocked its first reader. Here each
is one :class:`MountRefused` whose message says what to do instead; the CLI prints it as one
line and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from . import runtime

#: Where fusermount3 reads ``user_allow_other`` (a path libfuse compiles in).
FUSE_CONF = Path("/etc/fuse.conf")

#: Parallel warming fetches beyond this only exhaust descriptors and the store's patience.
MAX_PARALLELISM = 1024


class MountRefused(Exception):
    """A mount that must not start; the message is the one line the user sees."""


# -- argparse types ------------------------------------------------------------------------
def parallelism(text: str) -> int:
    """``--parallelism``: 1 to :data:`MAX_PARALLELISM` (0 or less used to be accepted)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_PARALLELISM:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PARALLELISM}, got {value}")
    return value


# -- credentials in URLs -------------------------------------------------------------------
def _redacted(url: str) -> str:
    """``url`` without its ``user:password@``, for a message that must not repeat them."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_no_credentials(source: str, endpoint_url: str | None) -> None:
    """Refuse ``user:password@`` in the source or the endpoint.

    A command line is visible to every user in ``ps``, and both URLs are repeated in the log
    and in ``/stats``: credentials belong in the environment or a Secret, which the S3 and
    HDFS clients read already.
    """
    if endpoint_url and "@" in urlsplit(endpoint_url).netloc:
        raise MountRefused(
            f"--endpoint-url must not contain credentials (user:password@): they would show in "
            f"`ps`, the log and /stats; pass --endpoint-url {_redacted(endpoint_url)} and put the "
            f"keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (on a cluster: the Dataset's secretRef)"
        )
    if "@" in urlsplit(source).netloc:
        raise MountRefused(
            f"the source URI must not contain credentials (user:password@): they would show in "
            f"`ps`, the log and /stats; mount {_redacted(source)} and put them in the environment "
            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, DATAHOARD_HDFS_USER) or a Secret"
        )


# -- FUSE options --------------------------------------------------------------------------
def user_allow_other(conf: Path = FUSE_CONF) -> bool:
    """Whether fuse.conf lets users other than root mount with ``allow_other``."""
    try:
        lines = conf.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


def check_allow_other(allow_other: bool) -> None:
    """Without ``user_allow_other`` fusermount3 refuses ``allow_other`` for non-root users, and
    libfuse reports only ``RuntimeError: 4``: say it up front."""
    if allow_other and os.geteuid() != 0 and not user_allow_other():
        raise MountRefused(
            f"letting every user read the view (the default) needs a line 'user_allow_other' in "
            f"{FUSE_CONF} when not mounting as root; add it, or pass --no-allow-other"
        )


# -- directories ---------------------------------------------------------------------------
def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_not_nested(mountpoint: Path, cache_dir: Path) -> None:
    """The cache must not live under the view (its writes would go through the read-only view
    being served, and the first read deadlocks, readers unkillable), nor the view under the
    cache (the view would hide, and be reached through, the cache's own files). Symlinks are
    resolved, so a link cannot smuggle either in."""
    mnt, cache = runtime.canonical_mountpoint(mountpoint), os.path.realpath(cache_dir)
    if _within(cache, mnt):
        raise MountRefused(f"the cache directory {cache_dir} is inside the mountpoint {mountpoint}"
                           + (f" (it resolves to {cache})" if cache != os.path.abspath(cache_dir) else "")
                           + "; choose a --cache-dir outside it")
    if _within(mnt, cache):
        raise MountRefused(f"the mountpoint {mountpoint} is inside the cache directory {cache_dir}"
                           + (f" (it resolves to {mnt})" if mnt != os.path.abspath(mountpoint) else "")
                           + "; choose a mountpoint or --cache-dir outside the other")


def check_cache_dir(cache_dir: Path) -> None:
    """Create the cache directory and prove a file can be written in it, so a read-only or
    foreign directory is one line now rather than a traceback from deep in the worker."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MountRefused(f"cannot use the cache directory {cache_dir}: {reason}; "
                           f"choose a writable --cache-dir") from None


__all__ = [
    "MountRefused", "parallelism", "check_no_credentials", "check_allow_other", "check_not_nested",
    "check_cache_dir", "user_allow_other",
]
