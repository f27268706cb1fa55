"""A fake cloud instance metadata service (IMDSv1/v2 as botocore asks it), handing the node's
role to whoever asks and counting every request: a worker that must not use the node's
identity is shown never to ask. Shared by the unit tier (tests/operator/test_worker_credentials.py)
and the cluster tier (tests/cluster/test_operator_tenancy.py).
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

#: The role name the fake hands out.
ROLE = "node-role"


class FakeMetadata(BaseHTTPRequestHandler):
    """IMDSv1/v2 as botocore's InstanceMetadataFetcher speaks it, counting every request."""

    requests: list[str] = []

    def _send(self, body: str, status: int = 200) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(f"PUT {self.path}")
        self._send("token")

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(f"GET {self.path}")
        base = "/latest/meta-data/iam/security-credentials/"
        if self.path == base:
            self._send(ROLE)
        elif self.path == base + ROLE:
            self._send(json.dumps({"Code": "Success", "AccessKeyId": "NODEKEY",
                                   "SecretAccessKey": "nodesecret", "Token": "nodetoken",
                                   "Expiration": "2099-01-01T00:00:00Z"}))
        else:
            self._send("", 404)

    def log_message(self, *_: object) -> None:
        pass
