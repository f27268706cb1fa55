#!/usr/bin/env bash
# Build the node half of a real one-node cluster from Go modules, once: kube-controller-manager,
# kube-scheduler, kubelet (k8s.io/kubernetes) and crictl (sigs.k8s.io/cri-tools, for teardown).
# etcd, kube-apiserver and kubectl come from build-envtest.sh (same versions).
#
# Why this shape: the same throw-away wrapper module as build-envtest.sh (k8s.io/kubernetes plus
# its ./staging replaces re-stated at the published v0.X.Y tags), built with the same Go module
# and build caches, so after envtest's kube-apiserver most packages are already compiled
# (measured: kcm ~130 s, scheduler ~10 s, kubelet ~35 s on 2 cores). CGO_ENABLED=0 works for the
# kubelet too.
#
# Usage: build-node.sh TOOLS_DIR   -> prints the directory holding the four binaries.
set -euo pipefail

K8S_VERSION="${ENVTEST_K8S_VERSION:-v1.34.4}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.34.0}"
TOOLS_DIR="${1:?usage: build-node.sh TOOLS_DIR}"
CMDS=(kube-controller-manager kube-scheduler kubelet)

OUT="$TOOLS_DIR/node-${K8S_VERSION#v}"
have_all() { for c in "${CMDS[@]}" crictl; do [[ -x "$OUT/$c" ]] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { echo "build-node: needs a Go toolchain (>= 1.24) on PATH" >&2; exit 1; }
mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.node.lock"
flock 9
if have_all; then echo "$OUT"; exit 0; fi

log() { echo "build-node: $*" >&2; }
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
NICE="nice -n 10"
WORK="$(mktemp -d "$TOOLS_DIR/.node-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/bin"
mkdir -p "$STAGE" "$OUT"
# Binaries from an interrupted earlier run are kept: each is complete once it is in $OUT.
cp -a "$OUT/." "$STAGE/" 2>/dev/null || true

log "building ${CMDS[*]} $K8S_VERSION (k8s.io/kubernetes; once, cached in $OUT)"
mkdir -p "$WORK/k8s"
(
    cd "$WORK/k8s"
    go mod init node-k8s >/dev/null 2>&1
    go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
    STAGING="v0.${K8S_VERSION#v1.}"
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > kmod.json
    GOMOD="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' kmod.json)"
    # shellcheck disable=SC2013  # module paths have no spaces
    for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$GOMOD"); do
        go mod edit -replace="$m=$m@$STAGING"
    done
    go mod edit -go="$(sed -n 's/^go //p' "$GOMOD")"
    {
        printf '//go:build tools\n\npackage tools\n\nimport (\n'
        for c in "${CMDS[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
        printf ')\n'
    } > tools.go
    go mod tidy >&2
    MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
    LDFLAGS="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
        LDFLAGS+=" -X $pkg.gitTreeState=clean"
    done
    for c in "${CMDS[@]}"; do
        [[ -x "$STAGE/$c" ]] && continue
        T0=$SECONDS
        $NICE go build -trimpath -ldflags="$LDFLAGS" -o "$STAGE/$c" "k8s.io/kubernetes/cmd/$c" >&2
        cp -a "$STAGE/$c" "$OUT/$c.tmp" && mv "$OUT/$c.tmp" "$OUT/$c"
        log "$c built in $((SECONDS - T0)) s"
    done
)
if [[ ! -x "$OUT/crictl" ]]; then
    T0=$SECONDS
    GOBIN="$STAGE" $NICE go install -trimpath -ldflags='-s -w' "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2
    cp -a "$STAGE/crictl" "$OUT/crictl.tmp" && mv "$OUT/crictl.tmp" "$OUT/crictl"
    log "crictl built in $((SECONDS - T0)) s"
fi
log "done: $OUT"
echo "$OUT"
