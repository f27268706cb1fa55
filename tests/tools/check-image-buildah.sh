#!/usr/bin/env bash
# Build the Dockerfile without a Docker engine, with buildah (chroot isolation, vfs storage), and
# smoke-test the image: the checks a `docker build` would make, on machines that have no engine.
#
# The one difference from a real build is the base: python:3.11-slim-bookworm comes from a
# registry this machine cannot reach, so the base is Debian bookworm from debootstrap with
# Debian's Python 3.11 (the same Debian release and Python minor version), built once and kept
# in TOOLS_DIR. The host's CA bundle goes into that base so pip works behind the same TLS proxy
# as the host. Everything in the Dockerfile itself runs as written.
#
# Usage: check-image-buildah.sh TOOLS_DIR      (needs root, buildah and debootstrap)
# With S3_ENDPOINT and S3_BUCKET (objects under train/), the cache worker in the image also
# mounts that bucket through /dev/fuse, warms it and serves every file from its cache.
set -euo pipefail

TOOLS_DIR="${1:?usage: check-image-buildah.sh TOOLS_DIR}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
IMAGE=localhost/datahoard:buildah-check
STORE="$TOOLS_DIR/buildah"
mkdir -p "$STORE"
RUNROOT="$(mktemp -d /tmp/datahoard-buildah.XXXXXX)"
BUILDAH=(buildah --root "$STORE/storage" --runroot "$RUNROOT" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
log() { echo "check-image: $*" >&2; }

CONTAINERS=()
cleanup() {
    for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done
    "${BUILDAH[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$RUNROOT"
}
trap cleanup EXIT

# One base build at a time (concurrent test runs wait).
exec 9>"$STORE/.lock"
flock 9

# 1. The base, once (shared with build-node-images.sh).
# shellcheck source=/dev/null  # buildah-base.sh, checked on its own
. "$(dirname "$0")/buildah-base.sh"
ensure_base

# 2. The Dockerfile as written, on that base.
log "building the Dockerfile"
"${BUILDAH[@]}" bud --isolation chroot --network host --layers=false \
    --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" >&2

# 3. The image's entrypoint, as each component runs it.
c="$("${BUILDAH[@]}" from "$IMAGE")"
CONTAINERS+=("$c")
run() { "${BUILDAH[@]}" run --isolation chroot "$@"; }
log "smoke tests"
# The operator as the chart runs it: uid/gid 65532.
# shellcheck disable=SC2016  # expanded in the container
run --user 65532:65532 "$c" -- sh -c 'test "$(id -u)" = 65532 && datahoard-entrypoint operator --help >/dev/null'
run "$c" -- datahoard-entrypoint csi-node --help >/dev/null
run "$c" -- datahoard mount --help >/dev/null
run "$c" -- fusermount3 --version >/dev/null
run "$c" -- grep -qx user_allow_other /etc/fuse.conf
# The cleanup Job's script needs sh, umount, rm, rmdir.
run "$c" -- sh -c 'command -v umount && command -v rm && command -v rmdir' >/dev/null
# 4. The cache worker for real: a FUSE view of an S3 bucket, warmed, then read from the cache.
if [[ -n "${S3_ENDPOINT:-}" ]]; then
    log "cache worker: mounting s3://$S3_BUCKET/train/ from $S3_ENDPOINT through /dev/fuse"
    w="$("${BUILDAH[@]}" from --device /dev/fuse --cap-add CAP_SYS_ADMIN "$IMAGE")"
    CONTAINERS+=("$w")
    # shellcheck disable=SC2016  # expanded in the container
    run --network host -e AWS_ACCESS_KEY_ID=testing -e AWS_SECRET_ACCESS_KEY=testing \
        -e "S3_ENDPOINT=$S3_ENDPOINT" -e "S3_BUCKET=$S3_BUCKET" "$w" -- sh -euc '
        mkdir -p /mnt/view /tmp/cache
        datahoard mount "s3://$S3_BUCKET/train/" /mnt/view --cache-dir /tmp/cache \
            --endpoint-url "$S3_ENDPOINT" --region us-east-1 --warm --wait
        cat /mnt/view/* > /dev/null
        datahoard status /mnt/view
        datahoard status /mnt/view | grep -q "^hit ratio *1.000$"
        datahoard umount /mnt/view' >&2
fi
log "ok"
echo ok
