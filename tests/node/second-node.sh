#!/usr/bin/env bash
# A second node for the one-node cluster of cluster.sh, on the same machine: its own containerd
# (root, state, socket), its own kubelet (name "<hostname>-2", ports 10350/10348, cgroupRoot
# /datahoard-node2) and a second host-local pod range on the same bridge dh0. Placement across
# nodes (issue 14: "the pod lands only where the cache is") then shows in space.
#
#   second-node.sh up      start it (cluster.sh up first), wait for the node to be Ready
#   second-node.sh down    stop it, delete the Node; leaves no process, mount, cgroup or hosts line
#   second-node.sh status  exit 0 when its kubelet answers its healthz
#
# Why a mount namespace: the chart's CSI DaemonSet and the cache workers use one
# csiNode.kubeletDir and one worker.hostRoot on every node, so this node's kubelet root and host
# root must sit at the same paths as the first node's. Every process of this node (containerd, its
# shims and containers, the kubelet) runs in one mount namespace (`unshare -m`, held by a `sleep`),
# where those two paths are bind mounts of this node's own directories, made rshared again (the
# unshare makes everything private, so nothing of either node propagates to the other), and
# /run/netns is a tmpfs of its own (the first node's `down` deletes /run/netns/cni-*). Killing
# every process of the namespace drops all of its mounts at once.
#
# Environment: TOOLS_DIR, NODE_DIR as for cluster.sh.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=tests/node/node-configs.sh
. "$REPO/tests/node/node-configs.sh"
TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/datahoard-tools}"
NODE_DIR="${NODE_DIR:-/var/lib/datahoard-node}"
RUN1=/run/datahoard-node
N2="$NODE_DIR/node2"                          # this node's state (containerd's root survives down)
RUN="/run/datahoard-node2"
SOCK="$RUN/containerd/containerd.sock"
PKI="$NODE_DIR/pki"
PIDS="$N2/pids"
LOGS="$N2/logs"
KUBELET_DIR="$NODE_DIR/var/kubelet"           # the chart's csiNode.kubeletDir (cluster.sh)
HOST_ROOT="$NODE_DIR/var/datahoard"           # the chart's worker.hostRoot (cluster.sh)
NODE_NAME="$(hostname)-2"
CGROUP_ROOT=datahoard-node2
PORT=10350
HEALTHZ=10348
HOSTS_TAG="# datahoard second node"
BRIDGE=dh0
HOST_IP=10.244.0.1
API_SERVICE_IP=10.96.0.1
export KUBECONFIG="$PKI/admin.kubeconfig"

T0=$SECONDS
log() { echo "[node2 $((SECONDS - T0))s] $*" >&2; }
die() { echo "second-node: $*" >&2; exit 1; }

in_ns() { nsenter -t "$(cat "$PIDS/holder.pid")" -m -- "$@"; }

start() { # name command...: a process of this node, in its mount namespace
    local name=$1; shift
    setsid nohup nsenter -t "$(cat "$PIDS/holder.pid")" -m -- "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$PIDS/$name.pid"
}

cgroup_dirs() { find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d -name "$CGROUP_ROOT" 2>/dev/null; }

hosts_line() { # the node's name resolves to 127.0.0.1: the API server reaches kubelets by name
    grep -q "$HOSTS_TAG" /etc/hosts || printf '127.0.0.1 %s %s\n' "$NODE_NAME" "$HOSTS_TAG" >> /etc/hosts
}

hosts_line_remove() { # in place (/etc/hosts may be a bind mount: no rename)
    local kept
    kept="$(grep -v "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts
}

certs() {
    [[ -f "$PKI/node2-serving.crt" ]] && return 0
    (
        cd "$PKI"
        cert node2 "system:node:$NODE_NAME" system:nodes
        cert node2-serving "$NODE_NAME" "" "DNS:$NODE_NAME,IP:127.0.0.1"
        kubeconfig node2 > node2.kubeconfig
    )
}

write_configs() {
    mkdir -p "$N2"/{etc/cni,cni,kubelet,datahoard,log/pods,containerd-root} "$PIDS" "$LOGS" "$RUN"
    containerd_config "$N2/containerd-root" "$RUN/containerd" "$SOCK" "$N2/etc/cni" > "$N2/etc/containerd.toml"
    # The same bridge and subnet as the first node (pods of both reach each other and the host
    # directly, with no forwarding), the upper half of its addresses (cluster.sh keeps the lower).
    cni_conflist datahoard-node2 "{\"subnet\": \"10.244.0.0/24\", \"rangeStart\": \"10.244.0.128\", \"rangeEnd\": \"10.244.0.254\", \"gateway\": \"$HOST_IP\"}" \
        "$N2/cni" > "$N2/etc/cni/10-datahoard-node2.conflist"
    kubelet_config "$PORT" "$HEALTHZ" "$SOCK" "$N2/log/pods" node2-serving "/$CGROUP_ROOT" > "$N2/etc/kubelet.yaml"
}

own_namespace() { # the holder has unshared (read each time: the holder execs unshare after we fork it)
    [[ "$(readlink "/proc/$(cat "$PIDS/holder.pid")/ns/mnt")" != "$(readlink "/proc/$$/ns/mnt")" ]]
}

namespace_up() {
    setsid nohup unshare -m --propagation private sleep infinity >/dev/null 2>&1 < /dev/null &
    echo $! > "$PIDS/holder.pid"
    waitfor 10 "mount namespace held" own_namespace
    own_namespace || die "the holder is not in a mount namespace of its own"   # never bind over the first node's
    # shellcheck disable=SC2016 # expanded inside the namespace's shell
    in_ns sh -euc '
        # Drop the first node'"'"'s copies (pod volumes, rootfs, FUSE views): they are its, not ours.
        findmnt -rn -o TARGET | grep -E "^($1|$2)(/|\$)" | sort -r | xargs -r -n1 umount -l
        for pair in "$3:$4" "$5:$6"; do
            mount --bind "${pair%%:*}" "${pair#*:}"
            mount --make-rshared "${pair#*:}"
        done
        mkdir -p /run/netns
        mount -t tmpfs -o size=1m,mode=755 second-node-netns /run/netns
        mount --make-shared /run/netns
    ' sh "$NODE_DIR" "$RUN1" "$N2/kubelet" "$KUBELET_DIR" "$N2/datahoard" "$HOST_ROOT"
    log "mount namespace: $KUBELET_DIR and $HOST_ROOT are this node's"
}

import_images() {
    local tar real stamp
    for tar in "$IMAGES"/pause.tar "$IMAGES"/datahoard.tar; do
        real="$(readlink -f "$tar")"
        stamp="$N2/containerd-root/.imported-$(basename "$real")-$(stat -c %Y "$real")"
        [[ -f "$stamp" ]] && continue
        ctr --address "$SOCK" -n k8s.io images import "$tar" >/dev/null
        touch "$stamp"
    done
    log "images imported"
}

node_ready() {
    [[ "$("$ENVTEST/kubectl" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}

status() { curl -sf --max-time 5 "http://127.0.0.1:$HEALTHZ/healthz" >/dev/null 2>&1; }

up() {
    [[ $EUID -eq 0 ]] || die "needs root"
    "$REPO/tests/node/cluster.sh" status || die "the cluster is not up: run tests/node/cluster.sh up first"
    if status; then log "already up"; return 0; fi
    down >/dev/null
    ENVTEST="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")"
    NODEBIN="$("$REPO/tests/tools/build-node.sh" "$TOOLS_DIR")"
    IMAGES="$("$REPO/tests/tools/build-node-images.sh" "$TOOLS_DIR")"
    write_configs
    certs
    hosts_line
    getent ahostsv4 "$NODE_NAME" | grep -q '^127\.' || die "$NODE_NAME does not resolve to 127.0.0.1"
    local d
    for d in /sys/fs/cgroup/*/; do
        [[ -d "$d" && -w "$d" ]] && mkdir -p "$d$CGROUP_ROOT"
    done
    # A new cgroup v1 cpuset starts with no CPUs and no memory nodes: its children (the pods)
    # could run nowhere. The kubelet fills in its own kubepods, not the root it is given.
    if [[ -d "/sys/fs/cgroup/cpuset/$CGROUP_ROOT" ]]; then
        cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.cpus"
        cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.mems"
    fi
    namespace_up
    start containerd containerd --config "$N2/etc/containerd.toml"
    waitfor 30 "containerd up" ctr --address "$SOCK" version
    import_images
    start kubelet "$NODEBIN/kubelet" --config="$N2/etc/kubelet.yaml" --kubeconfig="$PKI/node2.kubeconfig" \
        --root-dir="$KUBELET_DIR" --cert-dir="$N2/kubelet-pki" --hostname-override="$NODE_NAME" -v=2
    waitfor 120 "node $NODE_NAME Ready" node_ready
}

down() {
    stop kubelet
    local crictl="$TOOLS_DIR/node-1.34.4/crictl"
    if [[ -S "$SOCK" && -x "$crictl" && -f "$PIDS/holder.pid" ]]; then
        timeout 60 "$crictl" --runtime-endpoint "unix://$SOCK" rmp -fa >/dev/null 2>&1 || true
    fi
    local s
    for s in "$RUN"/containerd/io.containerd.runtime.v2.task/k8s.io/*/shim.pid; do
        [[ -f "$s" ]] && kill "$(cat "$s")" 2>/dev/null
    done
    # And a shim started while this ran (a sandbox the kubelet was creating as it stopped) has
    # no shim.pid yet: every shim of this containerd goes. Seen once in a full make test.
    pkill -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
    stop containerd
    stop holder   # the last process of the mount namespace: its mounts go with it
    local cg
    for cg in $(cgroup_dirs); do find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; done
    if "$REPO/tests/node/cluster.sh" status; then
        ENVTEST="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")"
        "$ENVTEST/kubectl" delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    fi
    hosts_line_remove
    rm -rf "$RUN" "${N2:?}"/{etc,cni,kubelet,datahoard,log,kubelet-pki}
    leftovers
}

leftovers() {
    local left=()
    local s
    for s in "$PIDS"/*.pid; do [[ -f "$s" ]] && left+=("process $(basename "$s" .pid)"); done
    mapfile -t -O "${#left[@]}" left < <(cgroup_dirs | sed 's/^/cgroup /')
    mapfile -t -O "${#left[@]}" left < <(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" | sed 's/^/shim pid /')
    grep -q "$HOSTS_TAG" /etc/hosts && left+=("/etc/hosts line")
    if ((${#left[@]})); then printf 'second-node: left behind: %s\n' "${left[@]}" >&2; return 1; fi
    echo "second node down: nothing left running or mounted" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: second-node.sh up|down|status" >&2; exit 2 ;;
esac
