"""The ``datahoard`` command: mount a dataset on one machine, show its numbers, unmount it.

Errors are one line on stderr and a non-zero exit code; ``-v`` adds the details. This module
is the entry point only: the parser is :mod:`cli_args`, each subcommand has a module of its own
(:mod:`cli_mount`, :mod:`cli_status`, :mod:`cli_umount`), and what a mount shows while it
starts is :mod:`cli_progress`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .cli_args import CliError, build_parser
from .cli_mount import check_mount, lock_mountpoint, mount_background, mount_foreground
from .cli_refresh import refresh
from .cli_status import status
from .cli_umount import umount
from .mount_checks import MountRefused

log = logging.getLogger("datahoard")

#: Where a fatal error is also written, when set: the operator points it at the worker
#: container's terminationMessagePath, so the kubelet puts the error in the pod's status and the
#: operator can copy it into the Dataset's WorkersReady condition (issue 14).
TERMINATION_LOG_ENV = "DATAHOARD_TERMINATION_LOG"
#: The kubelet keeps at most 4 KiB of a termination message; one line needs far less.
_TERMINATION_MESSAGE_BYTES = 1024


def _fatal(message: str) -> int:
    """One line on stderr and, in a pod, the termination message; exit code 1."""
    print(f"datahoard: error: {message}", file=sys.stderr)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        text = message.encode()[:_TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
        try:
            Path(path).write_text(text + "\n")
        except OSError as exc:  # the error itself is on stderr already
            log.debug("cannot write the termination message to %s: %s", path, exc)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["csi-node"]:
        from datahoard.csi_node.server import main as csi_main

        return csi_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.raw_argv = list(argv)
    level = logging.WARNING - 10 * args.verbose
    if args.command == "mount" and args.foreground:
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "mount":
            check_mount(args)
            with lock_mountpoint(args) as args.mount_lock:
                return mount_foreground(args) if args.foreground else mount_background(args)
        if args.command == "status":
            return status(args)
        if args.command == "refresh":
            return refresh(args)
        if args.command == "umount":
            return umount(args)
    except (CliError, MountRefused) as exc:
        return _fatal(str(exc))
    except OSError as exc:  # the machine said no (permissions, a full disk, ...): one line too
        log.debug("details", exc_info=True)
        return _fatal(str(exc))
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
