"""A separate process talking to a FUSE keeper, for tests/test_fuse_keeper.py (the keeper must
be proven across processes: descriptors really passed, leases really tied to a process).

    keeper_peer.py deposit SOCK MOUNTPOINT FD        deposit FD, print a JSON line, hold the lease
    keeper_peer.py claim SOCK MOUNTPOINT PID FD [--hold]
        claim, and print what proves the descriptor is the one PID holds as FD: kcmp(2) says
        the two are one open file, fdinfo names the mount's connection, and the first request
        read from it is the mount's FUSE_INIT (opcode 26)

``--as-uid N``: drop to uid/gid N (after the imports: the interpreter may live where N cannot
read) before talking to the keeper. "Hold" = keep the keeper connection (the lease) open until stdin closes or we are killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import struct
import sys

import datahoard.runtime  # noqa: F401  (imported while still root, see --as-uid)
from datahoard.fuse_fds import fuse_connection
from datahoard.keeper_client import KeeperClient
from datahoard.keeper_protocol import KeeperError, KeeperRefused

_KCMP = {"x86_64": 312, "aarch64": 272}[platform.machine()]
_KCMP_FILE = 0


def main(argv: list[str]) -> int:
    if "--as-uid" in argv:
        uid = int(argv[argv.index("--as-uid") + 1])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    op, sock, mountpoint = argv[:3]
    out: dict = {}
    client = None
    try:
        client = KeeperClient(sock)
        if op == "deposit":
            client.deposit(mountpoint, {"major": 7, "minor": 40, "max_write": 131072}, int(argv[3]))
            out = {"result": "ok", "pid": os.getpid()}
        else:
            claimed = client.claim(mountpoint)
            if claimed is None:
                out = {"result": "none"}
            else:
                libc = ctypes.CDLL(None, use_errno=True)
                same = libc.syscall(_KCMP, int(argv[3]), os.getpid(), _KCMP_FILE, int(argv[4]), claimed.fd)
                opcode = None
                if select.select([claimed.fd], [], [], 5)[0]:
                    header = os.read(claimed.fd, 1 << 20)
                    opcode = struct.unpack_from("<II", header)[1]
                out = {"result": "ok", "state": claimed.state, "connection": fuse_connection(claimed.fd),
                       "kcmp": same, "opcode": opcode}
    except KeeperRefused as exc:
        out = {"result": "refused", "message": str(exc), "pid": exc.pid}
    except KeeperError as exc:
        out = {"result": "error", "kind": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
    if "--hold" in argv or (op == "deposit" and out.get("result") == "ok"):
        sys.stdin.read()
    if client is not None:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
