#!/usr/bin/env bash
# Build helm from its Go module, once, into TOOLS_DIR/helm-<version>/helm.
#
# Why build: helm's installer and release tarballs come from hosts CI cannot reach, while the Go
# module proxy is reachable; helm.sh/helm/v3 has no replace directives, so `go install` works.
# The version is stamped the way helm's own Makefile does, so `helm version` tells the truth.
#
# Usage: build-helm.sh TOOLS_DIR   -> prints the path of the helm binary.
# Honours HELM (printed as-is when it is an executable), so a machine with helm can skip the build.
# First build: ~3-6 min on 2 cores with a cold Go cache (bounded by BUILD_TIMEOUT); later: instant.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
BUILD_TIMEOUT="${HELM_BUILD_TIMEOUT:-1200}"
TOOLS_DIR="${1:?usage: build-helm.sh TOOLS_DIR}"

if [[ -n "${HELM:-}" && -x "${HELM}" ]]; then
    echo "$HELM"
    exit 0
fi

OUT="$TOOLS_DIR/helm-${HELM_VERSION#v}"
if [[ -x "$OUT/helm" ]]; then
    echo "$OUT/helm"
    exit 0
fi

command -v go >/dev/null || { echo "build-helm: needs a Go toolchain (>= 1.26 for helm $HELM_VERSION) on PATH" >&2; exit 1; }
mkdir -p "$TOOLS_DIR"
# One build at a time: concurrent test runs wait instead of building twice.
exec 9>"$TOOLS_DIR/.helm.lock"
flock 9
if [[ -x "$OUT/helm" ]]; then echo "$OUT/helm"; exit 0; fi

STAGE="$(mktemp -d "$TOOLS_DIR/.helm-build.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
echo "build-helm: building helm $HELM_VERSION from helm.sh/helm/v3 (once; cached in $OUT)" >&2
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOBIN="$STAGE"
LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
LDFLAGS+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
# The Kubernetes version `helm template`/`lint` assume without a cluster (.Capabilities, the
# chart's kubeVersion check). helm's Makefile derives it from client-go (v0.X.Y -> 1.X); without
# it the binary claims v1.20.0.
GOMOD="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
K8S_MINOR="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$GOMOD")"
[[ -n "$K8S_MINOR" ]] || { echo "build-helm: no k8s.io/client-go in $GOMOD" >&2; exit 1; }
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    LDFLAGS+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$K8S_MINOR"
done
timeout "$BUILD_TIMEOUT" nice -n 10 go install -trimpath -ldflags="$LDFLAGS" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
"$STAGE/helm" version --short >&2
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$STAGE/helm" "$OUT/helm"
echo "$OUT/helm"
