#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, without Docker or kind: containerd + runc +
# CNI from Debian; etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubelet built
# from Go modules (tests/tools/build-envtest.sh, build-node.sh); images built locally
# (build-node-images.sh) and imported into containerd. The measured recipe, with the blockers it
# works around, is ../shared/facts/real-cluster.md.
#
#   cluster.sh up       build what is missing (once, cached in TOOLS_DIR), start, wait for a Ready node
#   cluster.sh down     stop everything it started; leaves no process, mount, netns, bridge or cgroup
#   cluster.sh env      print the shell lines that point kubectl at the cluster
#   cluster.sh status   exit 0 when the API server answers
#   cluster.sh restart-kubelet   stop and start the kubelet (a fault test)
#
# Network: every component listens on 127.0.0.1. Pods sit on bridge dh0 (10.244.0.0/24), which has
# no uplink, no gateway route and no masquerade; ip_forward is not touched. The host holds
# 10.244.0.1 on dh0 (probes, webhooks, and servers the tests run for pods, like S3) and also the
# `kubernetes` Service's ClusterIP 10.96.0.1: pods get one route, 10.96.0.1/32 via 10.244.0.1, and
# socat forwards 10.96.0.1:443 to the API server. That is how in-cluster clients (the operator,
# the training-operator) reach the API server with no kube-proxy and no changes to their pods.
# Other ClusterIP Services do not work (no kube-proxy); the API server calls webhooks by endpoint
# IP (--enable-aggregator-routing) and the operator polls workers by pod IP.
#
# Environment: TOOLS_DIR (default ~/.cache/datahoard-tools), NODE_DIR (state, default
# /var/lib/datahoard-node). Needs root and `make node-sysdeps`.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=tests/node/node-configs.sh
. "$REPO/tests/node/node-configs.sh"
TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/datahoard-tools}"
NODE_DIR="${NODE_DIR:-/var/lib/datahoard-node}"
RUN=/run/datahoard-node                       # containerd state and socket (short socket paths)
SOCK="$RUN/containerd/containerd.sock"
BRIDGE=dh0
POD_CIDR=10.244.0.0/24
HOST_IP=10.244.0.1
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
PKI="$NODE_DIR/pki"
LOGS="$NODE_DIR/logs"
PIDS="$NODE_DIR/pids"
VAR="$NODE_DIR/var"                           # etcd, kubelet root, CNI state: purged by down
KUBELET_DIR="$VAR/kubelet"
NODE_NAME="$(hostname)"
export KUBECONFIG="$PKI/admin.kubeconfig"

T0=$SECONDS
log() { echo "[cluster $((SECONDS - T0))s] $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

binaries() {
    ENVTEST="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")"
    NODEBIN="$("$REPO/tests/tools/build-node.sh" "$TOOLS_DIR")"
    IMAGES="$("$REPO/tests/tools/build-node-images.sh" "$TOOLS_DIR")"
}

start() { # name command...: a process of ours, its pid kept for down
    local name=$1; shift
    setsid nohup "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$PIDS/$name.pid"
}

gen_pki() {
    mkdir -p "$PKI"
    (
        cd "$PKI"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=datahoard-node-ca" 2>/dev/null
        cert apiserver kube-apiserver "" \
            "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$API_SERVICE_IP,IP:$HOST_IP"
        cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
        cert admin kubernetes-admin system:masters
        cert controller-manager system:kube-controller-manager
        cert scheduler system:kube-scheduler
        cert kubelet "system:node:$NODE_NAME" system:nodes
        cert kubelet-serving "$NODE_NAME" "" "DNS:$NODE_NAME,DNS:localhost,IP:127.0.0.1"
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        for n in admin controller-manager scheduler kubelet; do
            kubeconfig "$n" > "$n.kubeconfig"
        done
    )
    log "pki generated"
}

write_configs() {
    mkdir -p "$NODE_DIR/etc/cni" "$VAR"/{etcd,cni,log/pods} "$KUBELET_DIR" "$NODE_DIR/containerd-root"
    containerd_config "$NODE_DIR/containerd-root" "$RUN/containerd" "$SOCK" "$NODE_DIR/etc/cni" \
        > "$NODE_DIR/etc/containerd.toml"
    # The lower half of the addresses: second-node.sh gives its pods the upper half.
    cni_conflist datahoard-node "{\"subnet\": \"$POD_CIDR\", \"rangeEnd\": \"10.244.0.127\", \"gateway\": \"$HOST_IP\"}" \
        "$VAR/cni" > "$NODE_DIR/etc/cni/10-datahoard-node.conflist"
    kubelet_config 10250 10248 "$SOCK" "$VAR/log/pods" kubelet-serving > "$NODE_DIR/etc/kubelet.yaml"
}

network_up() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$HOST_IP/24" dev "$BRIDGE"
    ip addr replace "$API_SERVICE_IP/32" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # Pods reach the API server at the kubernetes Service's address and on the bridge address.
    start socat-svc socat "TCP-LISTEN:443,bind=$API_SERVICE_IP,fork,reuseaddr" TCP:127.0.0.1:6443
    start socat-host socat "TCP-LISTEN:6443,bind=$HOST_IP,fork,reuseaddr" TCP:127.0.0.1:6443
}

import_images() {
    # containerd's root survives down (only --purge deletes it): a tarball already imported, by
    # its resolved name (the product image's carries its build-context hash), is not read again.
    local tar real stamp
    for tar in "$IMAGES"/pause.tar "$IMAGES"/datahoard.tar "$@"; do
        real="$(readlink -f "$tar")"
        stamp="$NODE_DIR/containerd-root/.imported-$(basename "$real")-$(stat -c %Y "$real")"
        [[ -f "$stamp" ]] && continue
        ctr --address "$SOCK" -n k8s.io images import "$tar" >/dev/null
        touch "$stamp"
    done
    log "images imported: $(ctr --address "$SOCK" -n k8s.io images ls -q | grep -v '^sha256' | tr '\n' ' ')"
}

node_ready() {
    [[ "$("$ENVTEST/kubectl" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}

start_kubelet() {
    start kubelet "$NODEBIN/kubelet" --config="$NODE_DIR/etc/kubelet.yaml" --kubeconfig="$PKI/kubelet.kubeconfig" \
        --root-dir="$KUBELET_DIR" --cert-dir="$KUBELET_DIR/pki" -v=2
}

restart_kubelet() { # the fault tests: the kubelet goes away and comes back; pods keep running
    status || die "not up"
    ENVTEST="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")"
    NODEBIN="$("$REPO/tests/tools/build-node.sh" "$TOOLS_DIR")"
    stop kubelet
    mv "$LOGS/kubelet.log" "$LOGS/kubelet.log.$(date +%s)"
    start_kubelet
    waitfor 120 "kubelet back on 127.0.0.1:10248" curl -sf http://127.0.0.1:10248/healthz
}

up() {
    [[ $EUID -eq 0 ]] || die "needs root (containerd, runc, the pod bridge)"
    for tool in containerd runc ctr socat ip openssl /usr/lib/cni/bridge; do
        command -v "$tool" >/dev/null || die "$tool is missing: run 'make node-sysdeps'"
    done
    getent ahostsv4 "$NODE_NAME" | grep -q '^127\.' \
        || die "the hostname $NODE_NAME must resolve to 127.0.0.1 (the API server reaches the kubelet by it): add it to /etc/hosts"
    if status; then   # up already: bring its images up to date (a changed Dockerfile or source)
        binaries; import_images; log "already up"; return 0
    fi
    down >/dev/null
    binaries
    mkdir -p "$LOGS" "$PIDS" "$RUN"
    [[ -f "$PKI/ca.crt" ]] || gen_pki
    write_configs
    network_up
    # The workers' host root (the chart's worker.hostRoot): their FUSE views propagate to the host
    # and to the CSI plugin (Bidirectional / HostToContainer), which needs a shared mount; / is
    # private here, so the directory becomes its own rshared bind mount (the kubelet does the same
    # for its root dir). down unmounts it.
    mkdir -p "$VAR/datahoard"
    mount --bind "$VAR/datahoard" "$VAR/datahoard"
    mount --make-rshared "$VAR/datahoard"

    start containerd containerd --config "$NODE_DIR/etc/containerd.toml"
    waitfor 30 "containerd up" ctr --address "$SOCK" version
    import_images

    start etcd "$ENVTEST/etcd" --data-dir "$VAR/etcd" --listen-client-urls http://127.0.0.1:2379 \
        --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
        --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380 \
        --listen-metrics-urls http://127.0.0.1:2381 --unsafe-no-fsync
    waitfor 30 "etcd healthy" curl -sf http://127.0.0.1:2379/health
    start apiserver "$ENVTEST/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=127.0.0.1 --advertise-address="$HOST_IP" --secure-port=6443 \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
        --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=Hostname \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --allow-privileged=true --enable-aggregator-routing=true
    waitfor 90 "kube-apiserver ready" curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" https://127.0.0.1:6443/readyz
    start kcm "$NODEBIN/kube-controller-manager" --kubeconfig="$PKI/controller-manager.kubeconfig" \
        --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
        --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
        --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
        --controllers='*,-nodeipam,-route,-cloud-node-lifecycle' --pvclaimbinder-sync-period=2s
    start scheduler "$NODEBIN/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
        --authentication-kubeconfig="$PKI/scheduler.kubeconfig" --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --leader-elect=false
    start_kubelet
    waitfor 120 "node $NODE_NAME Ready" node_ready
    waitfor 60 "default ServiceAccount exists" "$ENVTEST/kubectl" -n default get sa default
    log "cluster up"
}

kubepods_cgroups() { find /sys/fs/cgroup -maxdepth 2 -type d -name kubepods 2>/dev/null; }

down() {
    [[ -d "$NODE_DIR/node2/pids" ]] && "$REPO/tests/node/second-node.sh" down
    stop kubelet                                  # first, so nothing restarts the pods
    local crictl="$TOOLS_DIR/node-1.34.4/crictl"
    if [[ -S "$SOCK" && -x "$crictl" ]]; then
        # Sandboxes torn down through the CRI: CNI DEL, netns removed, containers killed.
        timeout 60 "$crictl" --runtime-endpoint "unix://$SOCK" rmp -fa >/dev/null 2>&1 || true
    fi
    local s
    for s in "$RUN"/containerd/io.containerd.runtime.v2.task/k8s.io/*/shim.pid; do
        [[ -f "$s" ]] && kill "$(cat "$s")" 2>/dev/null
    done
    # And a shim started while this ran (a sandbox the kubelet was creating as it stopped) has
    # no shim.pid yet: every shim of this containerd goes. Seen once in a full make test.
    pkill -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
    for s in kcm scheduler apiserver etcd containerd socat-svc socat-host; do stop "$s"; done
    # Whatever is still mounted below our directories (pod volumes, rootfs, FUSE views): deepest first.
    findmnt -rn -o TARGET | grep -E "^($NODE_DIR|$RUN)(/|$)" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    local n
    for n in /run/netns/cni-*; do [[ -e "$n" ]] && ip netns del "$(basename "$n")" 2>/dev/null; done
    ip link del "$BRIDGE" 2>/dev/null || true
    local cg
    for cg in $(kubepods_cgroups); do find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; done
    rm -rf "$VAR" "$RUN" "${NODE_DIR:?}/etc"
    [[ "${1:-}" == --purge ]] && rm -rf "$NODE_DIR"
    leftovers
}

leftovers() { # what down must leave behind: nothing. Prints what is left, exits 1 if anything.
    local left=()
    local s
    for s in "$PIDS"/*.pid; do [[ -f "$s" ]] && left+=("process $(basename "$s" .pid)"); done
    mapfile -t -O "${#left[@]}" left < <(findmnt -rn -o TARGET | grep -E "^($NODE_DIR|$RUN)(/|$)" | sed 's/^/mount /')
    [[ -e "/sys/class/net/$BRIDGE" ]] && left+=("bridge $BRIDGE")
    mapfile -t -O "${#left[@]}" left < <(kubepods_cgroups | sed 's/^/cgroup /')
    mapfile -t -O "${#left[@]}" left < <(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" | sed 's/^/shim pid /')
    if ((${#left[@]})); then printf 'cluster: left behind: %s\n' "${left[@]}" >&2; return 1; fi
    echo "down: nothing left running or mounted" >&2
}

status() {
    [[ -f "$PKI/admin.crt" ]] && curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
        --key "$PKI/admin.key" https://127.0.0.1:6443/readyz >/dev/null 2>&1
}

env_lines() {
    local envtest node
    envtest="$("$REPO/tests/tools/build-envtest.sh" "$TOOLS_DIR")"
    node="$TOOLS_DIR/node-1.34.4"
    echo "export KUBECONFIG=$KUBECONFIG"
    echo "export PATH=$envtest:$node:\$PATH"
    echo "export CONTAINERD_ADDRESS=$SOCK CONTAINERD_NAMESPACE=k8s.io"
    echo "# the chart on this node: helm install datahoard charts/datahoard -n datahoard-system --create-namespace \\"
    echo "#   -f tests/node/values.yaml --set csiNode.kubeletDir=$KUBELET_DIR --set worker.hostRoot=$VAR/datahoard"
}

case "${1:-}" in
    up) up ;;
    down) shift; down "$@" ;;
    env) env_lines ;;
    status) status ;;
    restart-kubelet) restart_kubelet ;;
    import) shift; IMAGES="$("$REPO/tests/tools/build-node-images.sh" "$TOOLS_DIR")"; import_images "$@" ;;
    *) echo "usage: cluster.sh up|down [--purge]|env|status|import [TAR...]" >&2; exit 2 ;;
esac
