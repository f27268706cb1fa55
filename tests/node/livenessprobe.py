"""Stand-in for the kubernetes-csi livenessprobe sidecar, for the one-node test cluster only.

The chart runs registry.k8s.io/sig-storage/livenessprobe next to the CSI plugin. No registry is
reachable here and the Go module proxy refuses github.com/kubernetes-csi/livenessprobe (403), so
the cluster tier runs this instead: the same flags the chart passes (--csi-address,
--health-port), the same behaviour (GET /healthz calls the plugin's CSI Identity.Probe over its
socket; 200 when it answers ready, 500 otherwise). It is layered on the product image, whose
Python has grpc and the CSI stubs, by tests/tools/build-node-images.sh.
"""

from __future__ import annotations

import argparse
import http.server

import grpc

from datahoard.csi_node import csi_pb2, csi_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--csi-address", required=True)
    parser.add_argument("--health-port", type=int, default=9808)
    parser.add_argument("--probe-timeout", type=float, default=1.0)
    args = parser.parse_args()
    target = args.csi_address if args.csi_address.startswith("unix:") else f"unix://{args.csi_address}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/healthz":
                self.send_error(404)
                return
            try:
                with grpc.insecure_channel(target) as channel:
                    reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                        csi_pb2.ProbeRequest(), timeout=args.probe_timeout)
                ok = not reply.HasField("ready") or reply.ready.value
                body = b"ok" if ok else b"driver says not ready"
            except grpc.RpcError as exc:
                ok, body = False, f"probe failed: {exc.code().name}".encode()
            self.send_response(200 if ok else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("", args.health_port), Handler).serve_forever()


if __name__ == "__main__":
    main()
