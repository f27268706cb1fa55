#!/bin/sh
# The image's entrypoint: one image, three components.
#   operator  ARGS  -> kopf run of the operator's handlers (ARGS: e.g. --liveness=..., --verbose)
#   worker    ARGS  -> datahoard mount ARGS --foreground   (the operator sets `command` itself)
#   csi-node  ARGS  -> datahoard csi-node ARGS
#   anything else   -> run as given (datahoard status ..., sh, ...)
set -e
case "${1:-}" in
    operator)
        shift
        # --standalone: one replica (Recreate), so no peering objects or their RBAC are needed.
        exec kopf run --standalone --all-namespaces -m datahoard.operator.handlers "$@"
        ;;
    worker)
        shift
        exec datahoard mount "$@" --foreground
        ;;
    csi-node)
        shift
        exec datahoard csi-node "$@"
        ;;
    "")
        exec datahoard --help
        ;;
    *)
        exec "$@"
        ;;
esac
