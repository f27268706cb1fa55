"""The ``datahoard`` command line: one parser, a subcommand each for mount, status, umount and
the CSI node plugin, and the checks of each argument's value (a bad one is a one-line usage
error naming it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from . import mount_checks
from .units import parse_positive_size

#: The first line of ``datahoard --help``.
DESCRIPTION = "The ``datahoard`` command: mount a dataset on one machine, show its numbers, unmount it."
#: Seconds ``umount`` waits for the worker to exit once its view is gone, by default.
UMOUNT_TIMEOUT = 30.0


class CliError(Exception):
    """Printed as one line; exit code 1."""


def default_cache_dir(source: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "datahoard" / hashlib.sha256(source.encode()).hexdigest()[:16]


def _stats_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _size(text: str) -> int:
    """A size limit: a whole number of bytes, at least 1 (``0`` once meant "90% of the disk")."""
    try:
        return parse_positive_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is ``--help``'s job)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Seconds ``datahoard refresh`` waits: listing a million objects takes minutes.
REFRESH_TIMEOUT = 900.0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="datahoard", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a remote dataset read-only, with a local cache")
    m.add_argument("source", help="s3://bucket/prefix/ or hdfs://namenode:9870/path/")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--cache-dir", type=Path, help="local cache directory (default: ~/.cache/datahoard/<hash>)")
    m.add_argument("--capacity", type=_size, help="cache size limit, e.g. 200Gi (default: 90%% of free disk)")
    m.add_argument("--warm", action="store_true", help="prefetch the whole dataset in the background")
    m.add_argument("--wait", action="store_true",
                   help="with --warm: return only when warming is done (with --direct: and the tree is served)")
    m.add_argument("--include", action="append", default=[], metavar="GLOB", help="only paths matching (repeatable)")
    m.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave out paths matching (repeatable)")
    m.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    m.add_argument("--region")
    m.add_argument("--refresh", action="store_true", help="list the source again instead of reusing the index")
    m.add_argument("--snapshot-id", type=_snapshot_id, metavar="ID",
                   help="serve this listing snapshot (as `datahoard status` shows it) instead of listing the source "
                        "(env DATAHOARD_SNAPSHOT_ID)")
    m.add_argument("--snapshot-from", action="append", default=[], metavar="URL",
                   help="stats URL of a mount that holds it, e.g. http://10.0.0.5:9100 (repeatable; tried in order; "
                        "env DATAHOARD_SNAPSHOT_FROM, comma-separated)")
    m.add_argument("--parallelism", type=mount_checks.parallelism, default=16,
                   help=f"parallel fetches while warming, 1 to {mount_checks.MAX_PARALLELISM} (default 16)")
    m.add_argument("--bandwidth-limit", type=_size, metavar="BYTES_PER_S", help="cap warming traffic, e.g. 100M")
    m.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    m.add_argument("--stats-addr", type=_stats_addr, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="stats/metrics HTTP address (default: 127.0.0.1, any free port)")
    m.add_argument("--no-allow-other", dest="allow_other", action="store_false",
                   help="only the mounting user may read the view")
    m.add_argument("--direct", action="store_true",
                   help="once the whole dataset is cached, serve it as plain read-only files (a tree of hard "
                        "links into the cache, bind-mounted over MOUNTPOINT) with no FUSE hop: local-disk speed. "
                        "Reads of the tree never reach the worker; each open of a file there counts the whole file "
                        "as served from the cache (fanotify, as with kernel opens)")
    m.add_argument("--no-direct-bind", dest="direct_bind", action="store_false",
                   help="with --direct: build and publish the tree, but do not bind it over MOUNTPOINT "
                        "(Kubernetes workers: the CSI node plugin binds it into new pods)")
    m.add_argument("--no-kernel-opens", dest="kernel_opens", action="store_false",
                   help="keep answering every open in the worker even once the whole dataset is cached "
                        "(by default the kernel then opens files itself and fanotify counts the opens)")
    m.add_argument("--passthrough", dest="passthrough", action="store_const", const="on", default="auto",
                   help="answer opens of files whole in the cache with FUSE passthrough even when every file "
                        "fits in one chunk (by default only datasets with larger files use it: small files are "
                        "faster from the page cache, and once all are cached the kernel opens them itself)")
    m.add_argument("--no-passthrough", dest="passthrough", action="store_const", const="off",
                   help="serve every read through the worker, even of files whole in the cache")
    m.add_argument("--max-restarts", type=_restarts, default=5, metavar="N",
                   help="restart a worker that dies with an error up to N times in a row (default 5; 0: never)")
    m.add_argument("--no-keeper", dest="keeper", action="store_false",
                   help="do not hold the FUSE connection across worker restarts (a restart then remounts, and "
                        "readers see errors meanwhile)")
    m.add_argument("--consumers-dir", type=Path, metavar="DIR",
                   help="where the CSI node plugin records the pods this dataset is published to, so served "
                        "bytes are shown per pod by name (Kubernetes; without it pods are shown by UID)")
    m.add_argument("--log-file", help=argparse.SUPPRESS)
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the parent's MountLock

    s = sub.add_parser("status", help="show a mount's cache numbers")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true", help="print the raw stats document")

    r = sub.add_parser("refresh", help="list the source again and show its new files in the running mount")
    r.add_argument("mountpoint", type=Path)
    r.add_argument("--timeout", type=_seconds, default=REFRESH_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the new listing to be applied (default {REFRESH_TIMEOUT:g})")

    u = sub.add_parser("umount", help="unmount a dataset")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=_seconds, default=UMOUNT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the worker to exit after the unmount before stopping it "
                        f"with SIGTERM (default {UMOUNT_TIMEOUT:g})")

    sub.add_parser("csi-node", help="run the CSI node plugin", add_help=False)
    return parser


def _snapshot_id(text: str) -> str:
    text = text.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a snapshot id (64 hex digits, as `datahoard status` "
                                         "shows it)")
    return text


def _restarts(text: str) -> int:
    if not text.isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 1000, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day, got {text}")
    return value
