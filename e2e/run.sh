#!/usr/bin/env bash
# The whole path on a real cluster, in one command:
#   cluster (/dev/fuse on the nodes) -> image built and loaded -> chart installed ->
#   S3 with a synthetic dataset -> examples/dataset.yaml -> examples/job.yaml twice
#   (and examples/pytorchjob.yaml when the Kubeflow training operator is installed) reading and
#   verifying every file -> hit ratio > 0.9 and pods on cache nodes -> delete -> cleanup checked.
#
# Two cluster providers run the same steps (E2E_PROVIDER; `make e2e` picks kind when a Docker
# engine answers, else local):
#   kind   a kind cluster (GitHub Actions). Needs docker (a running engine), kind, kubectl, helm
#          (HELM=...; `make e2e` builds one). kind is installed with `go install` into TOOLS_DIR
#          when missing and Go is available. S3 is moto in a pod; images come from Docker Hub.
#   local  the real one-node cluster on this machine (tests/node/cluster.sh: no Docker, no
#          registry, no cluster DNS). Needs root and `make node-tools`. The product image is the
#          one cluster.sh builds from the Dockerfile; the examples' reader image is swapped for it
#          (it has Python) and their S3 endpoint for moto on the host's pod-bridge address
#          (PYTHON=... with moto; `make e2e` passes the venv's); the PyTorchJob runs its Master
#          only (a Worker would need cluster DNS to find it). A cluster that was already up is
#          reused and left up; one this script started is taken down.
# Environment: E2E_KEEP=1 keeps the cluster afterwards; E2E_CLUSTER names it (kind);
# E2E_TRAINING_OPERATOR=1 installs the Kubeflow training operator first (kind: from GitHub,
# needs internet; local: built from its Go module by tests/tools/build-training-operator.sh).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$REPO/e2e"
CLUSTER="${E2E_CLUSTER:-datahoard-e2e}"
NS="${E2E_NAMESPACE:-ml}"
SYSTEM_NS=datahoard-system
PROVIDER="${E2E_PROVIDER:-kind}"
IMAGE=datahoard:e2e
READER_IMAGE=python:3.12-slim-bookworm
EXAMPLE_ENDPOINT=http://minio.minio:9000   # examples/dataset.yaml's, e2e/s3.yaml's Service
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
TRAINING_OPERATOR_REF="${TRAINING_OPERATOR_REF:-v1.9.0}"
export TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/datahoard-tools}"
HELM="${HELM:-helm}"
FILES=120   # e2e/seed.yaml seeds this many files into the Dataset
DATASET=imagenet
LABEL="dataset.datahoard.io/${NS}.${DATASET}"   # datahoard.names.node_label(NS, DATASET)
export KUBECONFIG="${KUBECONFIG_E2E:-$HOME/.kube/datahoard-e2e.config}"
# local provider (tests/node/cluster.sh): its state directory and the host's pod-bridge address
NODE_DIR="${NODE_DIR:-/var/lib/datahoard-node}"
HOST_IP=10.244.0.1
LOCAL_S3_PORT="${E2E_S3_PORT:-9000}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
CLUSTER_SH="$REPO/tests/node/cluster.sh"

log() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nE2E FAILED: %s\n' "$*" >&2; exit 1; }

# 0. Tools.
case "$PROVIDER" in
kind)
    if ! command -v kind >/dev/null && [[ ! -x "$TOOLS_DIR/kind-$KIND_VERSION/kind" ]] && command -v go >/dev/null; then
        log "installing kind $KIND_VERSION into $TOOLS_DIR"
        GOBIN="$TOOLS_DIR/kind-$KIND_VERSION" go install "sigs.k8s.io/kind@$KIND_VERSION"
    fi
    KIND="$(command -v kind || echo "$TOOLS_DIR/kind-$KIND_VERSION/kind")"
    for tool in docker "$KIND" kubectl "$HELM"; do
        command -v "$tool" >/dev/null || { echo "e2e: $tool is missing" >&2; exit 2; }
    done
    docker info >/dev/null 2>&1 || { echo "e2e: the Docker engine is not reachable (docker info failed)" >&2; exit 2; }
    HOST_ROOT=/var/lib/datahoard   # the chart's worker.hostRoot on kind's nodes
    ;;
local)
    [[ $EUID -eq 0 ]] || { echo "e2e: the local provider needs root (tests/node/cluster.sh)" >&2; exit 2; }
    for tool in "$HELM" "$PYTHON"; do
        command -v "$tool" >/dev/null || { echo "e2e: $tool is missing (HELM=..., PYTHON=... with moto)" >&2; exit 2; }
    done
    "$PYTHON" -c "import moto.server" 2>/dev/null \
        || { echo "e2e: $PYTHON has no moto (PYTHON=... a Python with the test extras: make venv)" >&2; exit 2; }
    HOST_ROOT="$NODE_DIR/var/datahoard"
    IMAGE=localhost/datahoard:dev
    READER_IMAGE=localhost/datahoard:dev
    ;;
*) echo "e2e: E2E_PROVIDER must be kind or local, not '$PROVIDER'" >&2; exit 2 ;;
esac

# What differs between providers, in one place.
# The examples and e2e manifests as this provider can run them: unchanged on kind; on the local
# cluster with the locally built image, the host's S3 endpoint, and a Master-only PyTorchJob.
adapt() {  # file -> stdout
    if [[ "$PROVIDER" == kind ]]; then cat "$1"; return; fi
    "$PYTHON" - "$1" "$IMAGE" "http://$HOST_IP:$LOCAL_S3_PORT" "$EXAMPLE_ENDPOINT" <<'PY'
import re, sys
path, image, endpoint, example = sys.argv[1:]
text = open(path).read()
text = re.sub(r"^( *)image: (?:python:3\.12-slim-bookworm|datahoard:e2e)\n(?: *imagePullPolicy: .*\n)?",
              rf"\1image: {image}\n\1imagePullPolicy: Never\n", text, flags=re.M)
text = text.replace(example, endpoint)
if "kind: PyTorchJob" in text:
    text = text[:text.index("    Worker:")]
sys.stdout.write(text)
PY
}
on_node() {  # node command: a shell command on a node (kind: in its container; local: here)
    if [[ "$PROVIDER" == kind ]]; then docker exec "$1" sh -c "$2"; else sh -c "$2"; fi
}

diagnose() {
    log "diagnostics"
    kubectl get nodes -o wide --show-labels || true
    kubectl get datasets -A -o wide || true
    kubectl get all,pvc -A || true
    kubectl get pv,csidrivers,csinodes || true
    kubectl -n "$NS" describe dataset "$DATASET" || true
    kubectl -n "$NS" describe pods || true
    kubectl -n "$SYSTEM_NS" logs deploy/datahoard-operator --tail=200 || true
    kubectl -n "$SYSTEM_NS" logs -l app.kubernetes.io/component=csi-node -c csi-node --tail=100 --prefix || true
    kubectl -n "$SYSTEM_NS" logs -l app.kubernetes.io/component=cache-worker --tail=100 --prefix || true
    kubectl get events -A --sort-by=.lastTimestamp | tail -60 || true
}
LOCAL_WAS_UP=0
S3_PID=
finish() {
    local code=$?
    [[ $code -ne 0 ]] && diagnose
    [[ -n "$S3_PID" ]] && kill "$S3_PID" 2>/dev/null
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then
        echo "kept cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)" >&2
    elif [[ "$PROVIDER" == kind ]]; then
        "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    elif [[ "$LOCAL_WAS_UP" != 1 ]]; then
        "$CLUSTER_SH" down >&2 || code=1   # fails when it leaves anything behind
    fi
    exit $code
}
trap finish EXIT

# Wait until a jsonpath of an object has a value matching a regex.
wait_for() {  # what timeout_s kubectl-get-args... -- regex
    local what="$1" timeout="$2"; shift 2
    local args=() regex value deadline=$((SECONDS + timeout))
    while [[ "$1" != -- ]]; do args+=("$1"); shift; done
    regex="$2"
    until value="$(kubectl get "${args[@]}" 2>/dev/null)" && [[ "$value" =~ $regex ]]; do
        (( SECONDS < deadline )) || fail "timed out after ${timeout}s waiting for $what (last: '${value:-}')"
        sleep 3
    done
}

# Load a local image into every node. `kind load docker-image` fails for pulled multi-platform
# images when Docker uses the containerd image store (the default on new Docker 29 installs):
# kind#3795, "ctr: content digest ... not found". A single-platform archive loads there.
kind_load() {  # image
    "$KIND" load docker-image --name "$CLUSTER" "$1" && return 0
    log "kind load docker-image $1 failed; loading a single-platform archive instead"
    local archive
    archive="$(mktemp)"
    docker image save --platform "linux/$(docker version -f '{{.Server.Arch}}')" -o "$archive" "$1"
    "$KIND" load image-archive --name "$CLUSTER" "$archive"
    rm -f "$archive"
}

# 1. Cluster.
if [[ "$PROVIDER" == kind ]]; then
    log "creating kind cluster $CLUSTER"
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    "$KIND" create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 180s
    WORKERS=$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')
else
    "$CLUSTER_SH" status && LOCAL_WAS_UP=1
    log "bringing up the one-node cluster (tests/node/cluster.sh up; builds what is missing)"
    "$CLUSTER_SH" up
    eval "$("$CLUSTER_SH" env)"   # KUBECONFIG and PATH (kubectl) for this cluster
    WORKERS=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}')
fi
for node in $WORKERS; do
    on_node "$node" "test -c /dev/fuse" || fail "/dev/fuse is missing on $node (modprobe fuse on the host)"
    # Advertise fake GPUs (an extended resource): the Dataset's default placement and the
    # examples' GPU requests then behave as on a GPU cluster.
    kubectl patch node "$node" --subresource=status --type=json -p \
        '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]' >/dev/null
done
for node in $WORKERS; do
    wait_for "fake GPUs on $node" 60 node "$node" -o 'jsonpath={.status.allocatable.nvidia\.com/gpu}' -- '^4$'
done

# 2. Images.
if [[ "$PROVIDER" == kind ]]; then
    log "building $IMAGE and loading it into kind"
    docker build -t "$IMAGE" "$REPO"
    docker pull -q "$READER_IMAGE" >/dev/null
    kind_load "$IMAGE"
    kind_load "$READER_IMAGE"
    CHART_ARGS=(--set image.repository=datahoard --set image.tag=e2e)
else
    # cluster.sh up imported $IMAGE, built from the Dockerfile (tests/tools/build-node-images.sh).
    CHART_ARGS=(-f "$REPO/tests/node/values.yaml" --set "csiNode.kubeletDir=$NODE_DIR/var/kubelet"
                --set "worker.hostRoot=$HOST_ROOT")
fi

# 3. The chart, as the README installs it.
log "installing the chart"
"$HELM" install datahoard "$REPO/charts/datahoard" --namespace "$SYSTEM_NS" --create-namespace \
    "${CHART_ARGS[@]}" --wait --timeout 5m \
    --set policy.capacityResource=   # kind nodes report the runner's small disk; the example asks 200Gi
kubectl -n "$SYSTEM_NS" rollout status ds/datahoard-csi-node --timeout=180s
for node in $WORKERS; do
    wait_for "the CSI driver registered on $node" 120 csinode "$node" \
        -o 'jsonpath={.spec.drivers[*].name}' -- 'csi\.datahoard\.io'
done

# 4. S3 with the synthetic dataset (kind: in the cluster; local: on the host's bridge address,
# as there is no cluster DNS for minio.minio), seeded by the same Job.
log "starting S3 and seeding $FILES files"
if [[ "$PROVIDER" == kind ]]; then
    kubectl apply -f "$HERE/s3.yaml"
    kubectl -n minio rollout status deploy/minio --timeout=300s
else
    "$PYTHON" -m moto.server -H "$HOST_IP" -p "$LOCAL_S3_PORT" >/dev/null 2>&1 &
    S3_PID=$!
    deadline=$((SECONDS + 30))
    until curl -s -o /dev/null "http://$HOST_IP:$LOCAL_S3_PORT"; do
        kill -0 "$S3_PID" 2>/dev/null || fail "moto did not start on $HOST_IP:$LOCAL_S3_PORT (port in use?)"
        (( SECONDS < deadline )) || fail "moto did not answer on $HOST_IP:$LOCAL_S3_PORT within 30s"
        sleep 0.5
    done
    kubectl create namespace minio --dry-run=client -o yaml | kubectl apply -f -
fi
adapt "$HERE/seed.yaml" | kubectl apply -f -
kubectl -n minio wait --for=condition=complete job/seed --timeout=300s
kubectl -n minio logs job/seed

# 5. The Dataset, exactly as in examples/.
log "applying examples/s3-secret.yaml and examples/dataset.yaml"
kubectl create namespace "$NS"
kubectl -n "$NS" apply -f "$REPO/examples/s3-secret.yaml"
adapt "$REPO/examples/dataset.yaml" | kubectl -n "$NS" apply -f -
wait_for "Dataset $DATASET to be Ready (warmed)" 600 -n "$NS" dataset "$DATASET" \
    -o 'jsonpath={.status.phase}' -- '^Ready$'
kubectl -n "$NS" get datasets
[[ "$(kubectl -n "$NS" get dataset "$DATASET" -o 'jsonpath={.status.files}')" == "$FILES" ]] \
    || fail "the Dataset lists $(kubectl -n "$NS" get dataset "$DATASET" -o 'jsonpath={.status.files}') files, expected $FILES (include filter)"
CACHE_NODES=$(kubectl get nodes -l "$LABEL=true" -o jsonpath='{.items[*].metadata.name}')
[[ -n "$CACHE_NODES" ]] || fail "no node carries $LABEL=true"

# A pod's node must be a cache node, and its log must say it verified every file.
check_pod() {  # pod
    local node
    node=$(kubectl -n "$NS" get pod "$1" -o jsonpath='{.spec.nodeName}')
    [[ " $CACHE_NODES " == *" $node "* ]] || fail "pod $1 ran on $node, not on a cache node ($CACHE_NODES)"
    local logs
    logs="$(kubectl -n "$NS" logs "$1")"
    printf '%s\n' "$logs" >&2
    grep -qx "verified $FILES files" <<<"$logs" || fail "pod $1 did not verify $FILES files"
}

# 6. The training Job, twice.
for run in 1 2; do
    log "examples/job.yaml, run $run"
    kubectl -n "$NS" delete job read-imagenet --ignore-not-found --cascade=foreground --wait=true
    adapt "$REPO/examples/job.yaml" | kubectl -n "$NS" apply -f -
    if ! kubectl -n "$NS" wait --for=condition=complete job/read-imagenet --timeout=300s; then
        fail "job/read-imagenet did not complete (run $run)"
    fi
    check_pod "$(kubectl -n "$NS" get pods -l job-name=read-imagenet -o jsonpath='{.items[0].metadata.name}')"
done

# 7. The PyTorchJob, when the training operator is there (or asked for).
if [[ "${E2E_TRAINING_OPERATOR:-0}" == 1 && "$PROVIDER" == kind ]]; then
    log "installing the Kubeflow training operator $TRAINING_OPERATOR_REF"
    kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
    kubectl -n kubeflow rollout status deploy/training-operator --timeout=300s
elif [[ "${E2E_TRAINING_OPERATOR:-0}" == 1 ]]; then
    log "installing the Kubeflow training operator built from its Go module"
    TO_DIR="$("$REPO/tests/tools/build-training-operator.sh" "$TOOLS_DIR" "$(command -v kubectl)")"
    "$CLUSTER_SH" import "$TO_DIR/training-operator.tar"
    kubectl apply --server-side -f "$TO_DIR/standalone.yaml"
    kubectl -n kubeflow rollout status deploy/training-operator --timeout=300s
fi
if kubectl get crd pytorchjobs.kubeflow.org >/dev/null 2>&1; then
    log "examples/pytorchjob.yaml"
    # The training operator's validating webhook may still refuse requests for a moment after
    # its Deployment is Available (Service endpoints, CA bundle): retry the create briefly.
    for attempt in 1 2 3 4 5 6; do
        adapt "$REPO/examples/pytorchjob.yaml" | kubectl -n "$NS" apply -f - && break
        (( attempt < 6 )) || fail "could not create the PyTorchJob (training operator webhook?)"
        sleep 10
    done
    wait_for "the PyTorchJob to succeed" 600 -n "$NS" pytorchjob read-imagenet \
        -o 'jsonpath={.status.conditions[?(@.type=="Succeeded")].status}' -- '^True$'
    PODS=$(kubectl -n "$NS" get pods -l training.kubeflow.org/job-name=read-imagenet -o name)
    REPLICAS=$(adapt "$REPO/examples/pytorchjob.yaml" | grep -c '^      replicas: 1$')
    [[ $(wc -w <<<"$PODS") == "$REPLICAS" ]] || fail "expected $REPLICAS pods (master and worker), got: $PODS"
    for pod in $PODS; do
        kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded "$pod" --timeout=300s
        node=$(kubectl -n "$NS" get "$pod" -o jsonpath='{.spec.nodeName}')
        [[ " $CACHE_NODES " == *" $node "* ]] || fail "$pod ran on $node, not on a cache node"
        logs="$(kubectl -n "$NS" logs "$pod")"
        printf '%s\n' "$logs" >&2
        grep -q "verified $FILES files" <<<"$logs" || fail "$pod did not verify $FILES files"
    done
    kubectl -n "$NS" delete pytorchjob read-imagenet --cascade=foreground --wait=true
else
    log "no PyTorchJob CRD (set E2E_TRAINING_OPERATOR=1 to install the training operator): skipped"
fi

# 8. The numbers users see.
log "hit ratio"
sleep 15   # one stats collection after the last read (DATAHOARD_INTERVAL is 10s)
kubectl -n "$NS" get datasets
RATIO=$(kubectl -n "$NS" get dataset "$DATASET" -o 'jsonpath={.status.hitRatio}')
python3 -c "import sys; r = float(sys.argv[1]); sys.exit(0 if r > 0.9 else 1)" "${RATIO:-0}" \
    || fail "hit ratio ${RATIO:-none} is not above 0.9"
kubectl -n "$NS" get datasets | grep -q -- "$RATIO" || fail "kubectl get datasets does not show the hit ratio"

# 9. Delete and check that nothing is left behind.
log "deleting the Dataset"
kubectl -n "$NS" delete job read-imagenet --cascade=foreground --wait=true
kubectl -n "$NS" delete dataset "$DATASET" --timeout=300s
# datahoard.names: a readable prefix plus 12 hex digits of sha256("<namespace>/<name>").
DIGEST=$(printf '%s' "$NS/$DATASET" | sha256sum | cut -c1-12)
WORKER_NAME="dh-${NS}-${DATASET}-${DIGEST}"   # datahoard.names.worker_name
PV_NAME="datahoard-${NS}-${DATASET}-${DIGEST}"   # datahoard.names.pv_name
# Deletions finish asynchronously (PVC/PV protection finalizers, garbage collection): poll.
deadline=$((SECONDS + 60))
for what in "pvc/$DATASET -n $NS" "pv/$PV_NAME" "ds/$WORKER_NAME -n $SYSTEM_NS" \
            "secret/$WORKER_NAME -n $SYSTEM_NS"; do
    # shellcheck disable=SC2086
    while kubectl get $what >/dev/null 2>&1; do
        (( SECONDS < deadline )) || fail "$what is still there after the Dataset was deleted"
        sleep 3
    done
done
[[ -z "$(kubectl get nodes -l "$LABEL" -o name)" ]] || fail "nodes still carry $LABEL"
deadline=$((SECONDS + 180))
for node in $CACHE_NODES; do
    until on_node "$node" "test ! -e $HOST_ROOT/cache/$NS/$DATASET && test ! -e $HOST_ROOT/mnt/$NS/$DATASET"; do
        (( SECONDS < deadline )) || fail "cache or mount directory of $DATASET left on $node"
        sleep 3
    done
    ! on_node "$node" "grep -q '$HOST_ROOT/mnt/$NS/$DATASET' /proc/self/mountinfo" \
        || fail "a mount of $DATASET is left on $node"
done

log "uninstalling the chart"
"$HELM" uninstall datahoard --namespace "$SYSTEM_NS" --wait --timeout 3m
kubectl get crd datasets.datahoard.io >/dev/null || fail "the CRD should be kept on uninstall"

log "e2e passed"
