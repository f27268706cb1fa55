#!/usr/bin/env bash
# The Kubeflow training-operator (PyTorchJob & co.) for the one-node cluster, once:
#   training-operator.tar  localhost/training-operator:v1.8.1 - its binary, built from its Go
#                          module (the proxy serves only v1.8.1), alone in a scratch image
#   standalone.yaml        its manifests/overlays/standalone (CRDs from the same module zip),
#                          rendered by kubectl's kustomize, with that image and imagePullPolicy Never
# Why build: its images and GitHub manifests come from hosts CI cannot reach; the Go module
# proxy is reachable and the module zip carries the manifests.
#
# Usage: build-training-operator.sh TOOLS_DIR KUBECTL   -> prints the output directory.
set -euo pipefail

VERSION="${TRAINING_OPERATOR_VERSION:-v1.8.1}"
TOOLS_DIR="${1:?usage: build-training-operator.sh TOOLS_DIR KUBECTL}"
KUBECTL="${2:?usage: build-training-operator.sh TOOLS_DIR KUBECTL}"
OUT="$TOOLS_DIR/training-operator-${VERSION#v}"
IMAGE="localhost/training-operator:$VERSION"
if [[ -f "$OUT/training-operator.tar" && -f "$OUT/standalone.yaml" ]]; then echo "$OUT"; exit 0; fi

mkdir -p "$OUT"
exec 9>"$TOOLS_DIR/.training-operator.lock"
flock 9
if [[ -f "$OUT/training-operator.tar" && -f "$OUT/standalone.yaml" ]]; then echo "$OUT"; exit 0; fi
log() { echo "build-training-operator: $*" >&2; }
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
WORK="$(mktemp -d /tmp/datahoard-training-operator.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

T0=$SECONDS
log "building github.com/kubeflow/training-operator $VERSION (once, cached in $OUT)"
GOBIN="$WORK/bin" nice -n 10 go install -trimpath -ldflags='-s -w' \
    "github.com/kubeflow/training-operator/cmd/training-operator.v1@$VERSION" >&2
log "built in $((SECONDS - T0)) s"
cd "$WORK"
umoci init --layout oci >/dev/null && umoci new --image oci:to
umoci unpack --rootless --image oci:to b >/dev/null
install -m755 bin/training-operator.v1 b/rootfs/manager
mkdir -p b/rootfs/tmp && chmod 1777 b/rootfs/tmp
umoci repack --image oci:to b >/dev/null
umoci config --image oci:to --config.entrypoint /manager --os linux --architecture amd64
skopeo copy -q oci:oci:to "docker-archive:$OUT/training-operator.tar.tmp:$IMAGE"

SRC="$(go env GOMODCACHE)/github.com/kubeflow/training-operator@$VERSION"
[[ -d "$SRC/manifests/overlays/standalone" ]] || { log "no manifests in $SRC"; exit 1; }
"$KUBECTL" kustomize "$SRC/manifests/overlays/standalone" > standalone.yaml
python3 - standalone.yaml "$IMAGE" <<'PY'
import re, sys
path, image = sys.argv[1:]
text = open(path).read()
text, n = re.subn(r"image: kubeflow/training-operator:\S+",
                  f"image: {image}\n        imagePullPolicy: Never", text)
assert n == 1, f"expected one training-operator image in the overlay, found {n}"
open(path, "w").write(text)
PY
mv standalone.yaml "$OUT/standalone.yaml"
mv "$OUT/training-operator.tar.tmp" "$OUT/training-operator.tar"
log "done in $((SECONDS - T0)) s: $OUT"
echo "$OUT"
