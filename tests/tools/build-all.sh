#!/usr/bin/env bash
# Builds every tool the tests marked `tools` need, in the order `make test` reaches them, in two
# groups:
#   first: the kubelet's plugin watcher and csi-sanity (tests/csi_node), envtest (cluster tier),
#          helm (chart tier), MinIO and the latency proxy (the benchmark's smoke test);
#   node:  the node binaries, images, training-operator and torch (node tier, e2e).
# Each build script takes its own lock and checks again under it, so a second caller waits for a
# build under way and then finds it done; once built, each is instant.
#
#   build-all.sh TOOLS_DIR               build both groups, or wait for builds under way
#   build-all.sh TOOLS_DIR first|node    only that group
#   build-all.sh TOOLS_DIR --background  both, detached at nice 10, logging to
#                                        TOOLS_DIR/build-all.log; returns at once
# Prints nothing on success.
#
# Why in the background: on a fresh 2-core machine these builds take about half an hour, almost
# all of it Go compiling, and the tests that need none of them (unit, integration: FUSE, moto,
# HDFS) take about as long and spend much of it waiting on sockets and sleeps. `make test` runs
# those while this builds, then waits for the first group and runs the tests that need it while
# the node group builds, then waits for that and runs the node tier.
set -euo pipefail
TOOLS_DIR="${1:?usage: build-all.sh TOOLS_DIR [first|node|--background]}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$TOOLS_DIR"

if [[ "${2:-}" == --background ]]; then
    nohup nice -n 10 "$0" "$TOOLS_DIR" >"$TOOLS_DIR/build-all.log" 2>&1 </dev/null &
    exit 0
fi

step() {   # says how long a build (or the wait for one) took; silent when it was already there
    local t0=$SECONDS
    "$@" >/dev/null
    if ((SECONDS > t0)); then echo "build-all: $(basename "$1") ready after $((SECONDS - t0)) s" >&2; fi
}
T0=$SECONDS
group="${2:-all}"
if [[ "$group" == first || "$group" == all ]]; then
    step "$REPO/tests/csi_node/kubeletwatcher/build.sh" "$TOOLS_DIR"
    step "$REPO/tests/tools/build-csi-sanity.sh" "$TOOLS_DIR"
    step "$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR"
    step "$REPO/tests/tools/build-helm.sh" "$TOOLS_DIR"
    step "$REPO/bench/build-tools.sh" "$TOOLS_DIR"
fi
if [[ "$group" == node || "$group" == all ]]; then
    KUBECTL="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")/kubectl"
    step "$REPO/tests/tools/build-node.sh" "$TOOLS_DIR"
    step "$REPO/tests/tools/build-node-images.sh" "$TOOLS_DIR"
    step "$REPO/tests/tools/build-training-operator.sh" "$TOOLS_DIR" "$KUBECTL"
    step "$REPO/tests/tools/build-torch.sh" "$TOOLS_DIR"
fi
if ((SECONDS > T0)); then echo "build-all: $group ready after $((SECONDS - T0)) s" >&2; fi
