#!/usr/bin/env bash
# Builds every tool the tests marked `tools` need, in the order `make test` reaches them: the
# kubelet's plugin watcher and csi-sanity (tests/csi_node), envtest (cluster tier), helm (chart
# tier), the node binaries, images, training-operator and torch (node tier), MinIO and the
# latency proxy (the benchmark's smoke test). Each build script takes its
# own lock and checks again under it, so a second caller waits for a build under way and then
# finds it done; once built, each is instant.
#
#   build-all.sh TOOLS_DIR               build, or wait for builds under way; prints nothing on success
#   build-all.sh TOOLS_DIR --background  start that detached at nice 10, logging to
#                                        TOOLS_DIR/build-all.log, and return at once
#
# Why in the background: on a fresh 2-core machine these builds take about half an hour, almost
# all of it Go compiling, and the tiers that need none of them (unit, integration: FUSE, moto,
# HDFS) take about as long and spend much of it waiting on sockets and sleeps. `make test` runs
# those tiers while this builds, then calls it again in the foreground to wait for the rest.
set -euo pipefail
TOOLS_DIR="${1:?usage: build-all.sh TOOLS_DIR [--background]}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$TOOLS_DIR"

if [[ "${2:-}" == --background ]]; then
    nohup nice -n 10 "$0" "$TOOLS_DIR" >"$TOOLS_DIR/build-all.log" 2>&1 </dev/null &
    exit 0
fi

step() {
    local t0=$SECONDS
    "$@" >/dev/null
    echo "build-all: $(basename "$1") ready after $((SECONDS - t0)) s" >&2
}
T0=$SECONDS
step "$REPO/tests/csi_node/kubeletwatcher/build.sh" "$TOOLS_DIR"
step "$REPO/tests/tools/build-csi-sanity.sh" "$TOOLS_DIR"
step "$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR"
KUBECTL="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")/kubectl"
step "$REPO/tests/tools/build-helm.sh" "$TOOLS_DIR"
step "$REPO/tests/tools/build-node.sh" "$TOOLS_DIR"
step "$REPO/tests/tools/build-node-images.sh" "$TOOLS_DIR"
step "$REPO/tests/tools/build-training-operator.sh" "$TOOLS_DIR" "$KUBECTL"
step "$REPO/tests/tools/build-torch.sh" "$TOOLS_DIR"
step "$REPO/bench/build-tools.sh" "$TOOLS_DIR"
echo "build-all: every tool ready after $((SECONDS - T0)) s" >&2
