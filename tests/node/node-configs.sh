#!/usr/bin/env bash
# The files a node is made of, written the same way for the first node (cluster.sh) and the
# second (second-node.sh): a kubeconfig, containerd's config, the CNI bridge and the kubelet's
# config, and the two helpers both need (stop a process of ours; sign a certificate). Sourced,
# not run; each config function prints the file on stdout.

waitfor() { # seconds description command...: a bounded poll; the caller's log() reports success
    local n=$1 d=$2; shift 2
    local deadline=$((SECONDS + n))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || { echo "$(basename "$0" .sh): timed out after ${n}s: $d (logs in $LOGS)" >&2; return 1; }
        sleep 0.3
    done
    log "$d"
}

stop() { # name: TERM, then KILL after 10 s ($PIDS/name.pid)
    local f="$PIDS/$1.pid" pid
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

cert() { # name CN O [SAN]: a key and a certificate signed by the cluster CA (in the current directory)
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2${3:+/O=$3}" 2>/dev/null
    if [[ -n "${4:-}" ]]; then printf 'subjectAltName=%s\n' "$4" > "$1.ext"; else : > "$1.ext"; fi
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

# kubeconfig USER: a client of the API server on loopback with $PKI/USER.{crt,key}.
kubeconfig() {
    cat <<KC
apiVersion: v1
kind: Config
clusters:
- name: datahoard-node
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$PKI/$1.crt", client-key: "$PKI/$1.key"}
contexts:
- name: datahoard-node
  context: {cluster: datahoard-node, user: $1}
current-context: datahoard-node
KC
}

# containerd_config ROOT STATE SOCKET CNI_CONF_DIR
containerd_config() {
    cat <<EOF
version = 2
root = "$1"
state = "$2"
[grpc]
  address = "$3"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  # No CAP_SYS_RESOURCE in this machine's bounding set: a negative oom_score_adj (pause -998,
  # Guaranteed pods -997) makes runc init fail ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # Only 127.0.0.1: kubectl exec/logs/port-forward streams.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$4"
EOF
}

# cni_conflist NAME RANGE_JSON DATA_DIR: a bridge with no gateway and no masquerade on $BRIDGE:
# pods reach each other and the host's addresses, nothing else. The one route: the kubernetes
# Service IP, held by the host.
cni_conflist() {
    cat <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$1",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local",
              "ranges": [[$2]],
              "routes": [{"dst": "$API_SERVICE_IP/32", "gw": "$HOST_IP"}],
              "dataDir": "$3"}},
    {"type": "loopback"}
  ]
}
EOF
}

# kubelet_config PORT HEALTHZ_PORT SOCKET POD_LOGS SERVING_CERT_NAME [CGROUP_ROOT]
kubelet_config() {
    cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $1
healthzBindAddress: 127.0.0.1
healthzPort: $2
readOnlyPort: 0
containerRuntimeEndpoint: unix://$3
cgroupDriver: cgroupfs
${6:+cgroupRoot: $6
}failCgroupV1: false
failSwapOn: false
podLogsDir: $4
tlsCertFile: $PKI/$5.crt
tlsPrivateKeyFile: $PKI/$5.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
serializeImagePulls: false
EOF
}
