#!/usr/bin/env bash
# csi-sanity (the CSI spec's conformance suite, github.com/kubernetes-csi/csi-test) built once from
# its Go module into $1/csi-sanity-<version>/ (about 90 s cold); prints the binary's path.
set -euo pipefail
VERSION="${CSI_TEST_VERSION:-v5.6.0}"
TOOLS_DIR="${1:?usage: build-csi-sanity.sh TOOLS_DIR}"
OUT="$TOOLS_DIR/csi-sanity-$VERSION"
if [[ -x "$OUT/csi-sanity" ]]; then echo "$OUT/csi-sanity"; exit 0; fi
command -v go >/dev/null || { echo "build-csi-sanity: needs a Go toolchain on PATH" >&2; exit 1; }
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
if [[ -x "$OUT/csi-sanity" ]]; then echo "$OUT/csi-sanity"; exit 0; fi
GOTOOLCHAIN=local GOBIN="$OUT" nice -n 10 go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$VERSION" >&2
echo "$OUT/csi-sanity"
