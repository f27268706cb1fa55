#!/usr/bin/env bash
# Build the envtest binaries (etcd, kube-apiserver, kubectl) from Go modules, once.
#
# Why build: setup-envtest downloads from GitHub/GCS, which CI cannot reach, while the Go module
# proxy is reachable. Why this shape: k8s.io/kubernetes requires its ~30 staging modules at
# v0.0.0 and replaces them with ./staging paths, and Go ignores replace directives of
# dependencies; so a throw-away wrapper module re-states those replaces with the published
# staging tags (k8s v1.X.Y pairs with staging v0.X.Y). etcd gets its own wrapper module so its
# gRPC/protobuf versions are not bumped by Kubernetes' requirements.
#
# Usage: build-envtest.sh TOOLS_DIR   -> prints the directory holding the three binaries.
# Honours KUBEBUILDER_ASSETS (printed as-is when it already holds the binaries).
set -euo pipefail

K8S_VERSION="${ENVTEST_K8S_VERSION:-v1.34.4}"
# Kubernetes 1.34 ships etcd 3.6.x.
ETCD_VERSION="${ENVTEST_ETCD_VERSION:-v3.6.8}"
TOOLS_DIR="${1:?usage: build-envtest.sh TOOLS_DIR}"

have_all() { [[ -x "$1/etcd" && -x "$1/kube-apiserver" && -x "$1/kubectl" ]]; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && have_all "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

OUT="$TOOLS_DIR/envtest-${K8S_VERSION#v}"
if have_all "$OUT"; then
    echo "$OUT"
    exit 0
fi

command -v go >/dev/null || { echo "build-envtest: needs a Go toolchain (>= 1.24) on PATH" >&2; exit 1; }
mkdir -p "$TOOLS_DIR"
WORK="$(mktemp -d "$TOOLS_DIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# One build at a time: a concurrent `make test` waits instead of building twice.
exec 9>"$TOOLS_DIR/.envtest.lock"
flock 9
if have_all "$OUT"; then echo "$OUT"; exit 0; fi

log() { echo "build-envtest: $*" >&2; }
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
# 2-core machines: linking kube-apiserver is the memory peak; keep other work responsive.
NICE="nice -n 10"
STAGE="$WORK/bin"
mkdir -p "$STAGE"

# 1. etcd
log "building etcd $ETCD_VERSION (go.etcd.io/etcd/server/v3)"
mkdir -p "$WORK/etcd"
(
    cd "$WORK/etcd"
    go mod init envtest-etcd >/dev/null 2>&1
    go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
    go mod tidy >&2
    $NICE go build -trimpath -ldflags='-s -w' -o "$STAGE/etcd" go.etcd.io/etcd/server/v3 >&2
)

# 2. kube-apiserver + kubectl
log "building kube-apiserver and kubectl $K8S_VERSION (k8s.io/kubernetes)"
mkdir -p "$WORK/k8s"
(
    cd "$WORK/k8s"
    go mod init envtest-k8s >/dev/null 2>&1
    go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
    STAGING="v0.${K8S_VERSION#v1.}"
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > kmod.json
    GOMOD="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' kmod.json)"
    # shellcheck disable=SC2013  # module paths have no spaces
    for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$GOMOD"); do
        go mod edit -replace="$m=$m@$STAGING"
    done
    # Keep the go/godebug settings Kubernetes builds with.
    go mod edit -go="$(sed -n 's/^go //p' "$GOMOD")"
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    go mod tidy >&2
    # Stamp the version (Kubernetes' own build does this through hack/lib/version.sh), so
    # `kubectl version` and /version report it instead of v0.0.0-master.
    MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
    LDFLAGS="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
        LDFLAGS+=" -X $pkg.gitTreeState=clean"
    done
    $NICE go build -trimpath -ldflags="$LDFLAGS" -o "$STAGE/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
    $NICE go build -trimpath -ldflags="$LDFLAGS" -o "$STAGE/kubectl" k8s.io/kubernetes/cmd/kubectl >&2
)

rm -rf "$OUT"
mv "$STAGE" "$OUT"
log "done: $OUT"
echo "$OUT"
