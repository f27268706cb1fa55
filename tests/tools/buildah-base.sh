# shellcheck shell=bash
# Sourced by check-image-buildah.sh and build-node-images.sh: the base both build the Dockerfile
# on. python:3.11-slim-bookworm comes from a registry this machine cannot reach, so the base is
# Debian bookworm from debootstrap with Debian's Python 3.11 (the same Debian release and Python
# minor version), built once into the buildah store. The host's CA bundle goes into it so pip
# works behind the same TLS proxy as the host.
#
# Needs: BUILDAH (array: buildah with its --root/--runroot/--storage-driver), STORE, and a
# CONTAINERS array the caller's EXIT trap removes. Defines BASE and ensure_base.
BASE=localhost/datahoard-base:bookworm-py311

ensure_base() {
    "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1 && return 0
    echo "buildah-base: building $BASE with debootstrap, once" >&2
    local rootfs c mnt
    rootfs="$(mktemp -d "$STORE/rootfs.XXXXXX")"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >"$STORE/debootstrap.log" 2>&1 \
        || { tail -20 "$STORE/debootstrap.log" >&2; rm -rf "$rootfs"; return 1; }
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    c="$("${BUILDAH[@]}" from scratch)"
    CONTAINERS+=("$c")
    mnt="$("${BUILDAH[@]}" mount "$c")"
    cp -a "$rootfs/." "$mnt/"
    "${BUILDAH[@]}" umount "$c" >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "$c"
    "${BUILDAH[@]}" commit -q "$c" "$BASE" >/dev/null
    rm -rf "$rootfs"
}
