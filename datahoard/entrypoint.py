"""The container image's entrypoint: one image, three components.

    operator  ARGS  -> kopf run of the operator's handlers (ARGS: e.g. --liveness=..., --verbose)
    worker    ARGS  -> datahoard mount ARGS --foreground   (the operator sets ``command`` itself)
    csi-node  ARGS  -> datahoard csi-node ARGS
    anything else   -> run as given (datahoard status ..., sh, ...); nothing -> datahoard --help

The process execs the component, so it is PID 1 of the container and gets its signals.
"""

from __future__ import annotations

import os
import sys


def command(argv: list[str]) -> list[str]:
    """The command line a component runs as, for the entrypoint's arguments."""
    if not argv:
        return ["datahoard", "--help"]
    role, rest = argv[0], argv[1:]
    if role == "operator":
        # --standalone: one replica (Recreate), so no peering objects or their RBAC are needed.
        return ["kopf", "run", "--standalone", "--all-namespaces", "-m", "datahoard.operator.handlers", *rest]
    if role == "worker":
        return ["datahoard", "mount", *rest, "--foreground"]
    if role == "csi-node":
        return ["datahoard", "csi-node", *rest]
    return argv


def main() -> None:
    argv = command(sys.argv[1:])
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.exit(f"datahoard-entrypoint: cannot run {argv[0]}: {exc.strerror}")


if __name__ == "__main__":
    main()
