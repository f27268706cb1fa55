#!/usr/bin/env bash
# Build kubeletwatcher (main.go: the kubelet's plugin-registration machinery on one directory)
# once, into TOOLS_DIR/kubeletwatcher-<k8s version>/, and print the binary's path.
#
# Same wrapper-module shape as tests/tools/build-envtest.sh: k8s.io/kubernetes requires its
# staging modules at v0.0.0 with ./staging replaces that Go ignores in a dependency, so the
# wrapper re-states them at the published staging tags (k8s v1.X.Y pairs with staging v0.X.Y).
# Everything comes from the Go module proxy; with envtest's build cache warm this takes ~1 min.
set -euo pipefail

K8S_VERSION="${ENVTEST_K8S_VERSION:-v1.34.4}"
CSI_SPEC_VERSION=v1.9.0
TOOLS_DIR="${1:?usage: build.sh TOOLS_DIR}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SUM="$(sha256sum "$HERE/main.go" "$HERE/build.sh" | sha256sum | cut -c1-12)"
OUT="$TOOLS_DIR/kubeletwatcher-${K8S_VERSION#v}-$SUM/kubeletwatcher"
if [[ -x "$OUT" ]]; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { echo "kubeletwatcher: needs a Go toolchain (>= 1.24) on PATH" >&2; exit 1; }
mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.kubeletwatcher.lock"
flock 9
if [[ -x "$OUT" ]]; then echo "$OUT"; exit 0; fi
WORK="$(mktemp -d "$TOOLS_DIR/.build-kubeletwatcher.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
cd "$WORK"
cp "$HERE/main.go" .
go mod init kubeletwatcher >/dev/null 2>&1
go mod edit -require="k8s.io/kubernetes@$K8S_VERSION" -require="github.com/container-storage-interface/spec@$CSI_SPEC_VERSION"
STAGING="v0.${K8S_VERSION#v1.}"
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > kmod.json
GOMOD="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' kmod.json)"
# shellcheck disable=SC2013  # module paths have no spaces
for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$GOMOD"); do
    go mod edit -replace="$m=$m@$STAGING"
done
go mod tidy >&2
mkdir -p "$(dirname "$OUT")"
nice -n 10 go build -trimpath -ldflags='-s -w' -o "$OUT.tmp" . >&2
mv "$OUT.tmp" "$OUT"
echo "$OUT"
