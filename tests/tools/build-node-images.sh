#!/usr/bin/env bash
# The images the real one-node cluster (tests/node/cluster.sh) runs, built without a registry or a
# Docker engine, as docker-archive tarballs that `ctr images import` loads:
#   pause.tar      registry.k8s.io/pause:3.10 - a static C pause (containerd's sandbox image)
#   datahoard.tar  localhost/datahoard:dev    - the product image: the repository's Dockerfile
#                  built as written by buildah (`buildah bud`), on the debootstrap base that
#                  check-image-buildah.sh uses too. Nothing restates the Dockerfile, so the
#                  cluster's image cannot drift from it; the tarball is keyed by a hash of the
#                  Dockerfile and its build context and rebuilt when either changes.
#
# Usage: build-node-images.sh TOOLS_DIR   -> prints the directory holding the tarballs.
# Needs root, gcc, umoci, skopeo, buildah, debootstrap (make node-sysdeps).
set -euo pipefail

TOOLS_DIR="${1:?usage: build-node-images.sh TOOLS_DIR}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$TOOLS_DIR/node-images"
STORE="$TOOLS_DIR/buildah"
mkdir -p "$OUT" "$STORE"
log() { echo "build-node-images: $*" >&2; }

exec 9>"$STORE/.lock"   # the same lock as check-image-buildah.sh: one buildah user of the store
flock 9

WORK="$(mktemp -d /tmp/datahoard-node-images.XXXXXX)"
BUILDAH=(buildah --root "$STORE/storage" --runroot "$WORK/runroot" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
IMAGE=localhost/datahoard:dev
cleanup() {
    "${BUILDAH[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# 1. pause: what the kubelet's sandboxes run; containerd's sandbox_image names it.
if [[ ! -f "$OUT/pause.tar" ]]; then
    T0=$SECONDS
    cd "$WORK"
    cat > pause.c <<'C'
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>
static void sigdown(int s) { (void)s; _exit(0); }
static void sigreap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction a = {0};
  a.sa_handler = sigdown; sigaction(SIGINT, &a, NULL); sigaction(SIGTERM, &a, NULL);
  a.sa_handler = sigreap; a.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &a, NULL);
  for (;;) pause();
  return 1;
}
C
    gcc -static -Os -s -o pause pause.c
    umoci init --layout oci >/dev/null && umoci new --image oci:pause
    umoci unpack --rootless --image oci:pause b >/dev/null
    install -m755 pause b/rootfs/pause
    umoci repack --image oci:pause b >/dev/null
    umoci config --image oci:pause --config.entrypoint /pause --config.user 65535:65535 \
        --os linux --architecture amd64
    skopeo copy -q oci:oci:pause "docker-archive:$OUT/pause.tar.tmp:registry.k8s.io/pause:3.10"
    mv "$OUT/pause.tar.tmp" "$OUT/pause.tar"
    cd - >/dev/null
    log "pause image built in $((SECONDS - T0)) s"
fi

# 2. The product image: the Dockerfile, as written.
CONTEXT=(Dockerfile .dockerignore pyproject.toml README.md requirements.lock datahoard operator cache_worker csi_node)
KEY="$(cd "$REPO" && find "${CONTEXT[@]}" -type f ! -name '*.pyc' ! -name '_fastopen.so*' ! -path '*__pycache__*' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
if [[ ! -f "$OUT/datahoard-$KEY.tar" ]]; then
    T0=$SECONDS
    # shellcheck source=/dev/null  # buildah-base.sh, checked on its own
    . "$REPO/tests/tools/buildah-base.sh"
    ensure_base
    log "building the Dockerfile with buildah (context $KEY)"
    "${BUILDAH[@]}" bud --isolation chroot --network host --layers=false \
        --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" >"$WORK/bud.log" 2>&1 \
        || { tail -30 "$WORK/bud.log" >&2; exit 1; }
    "${BUILDAH[@]}" push -q "$IMAGE" "docker-archive:$OUT/datahoard.tar.tmp:$IMAGE" >&2
    rm -f "$OUT"/datahoard-*.tar "$OUT"/livenessprobe-*.tar "$OUT"/livenessprobe.tar
    mv "$OUT/datahoard.tar.tmp" "$OUT/datahoard-$KEY.tar"
    log "product image built in $((SECONDS - T0)) s"
fi
ln -sfn "datahoard-$KEY.tar" "$OUT/datahoard.tar"
echo "$OUT"
