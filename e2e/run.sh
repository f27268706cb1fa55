#!/usr/bin/env bash
# The whole path on a real cluster, in one command:
#   kind cluster (/dev/fuse on the nodes) -> image built and loaded -> chart installed ->
#   in-cluster S3 with a synthetic dataset -> examples/dataset.yaml -> examples/job.yaml twice
#   (and examples/pytorchjob.yaml when the Kubeflow training operator is installed) reading and
#   verifying every file -> hit ratio > 0.9 and pods on cache nodes -> delete -> cleanup checked.
#
# Needs: docker (a running engine), kind, kubectl, helm (HELM=...; `make e2e` builds one).
# kind is installed with `go install` into TOOLS_DIR when missing and Go is available.
# Environment: E2E_KEEP=1 keeps the cluster afterwards; E2E_CLUSTER names it;
# E2E_TRAINING_OPERATOR=1 installs the Kubeflow training operator (needs internet) first.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$REPO/e2e"
CLUSTER="${E2E_CLUSTER:-datahoard-e2e}"
NS="${E2E_NAMESPACE:-ml}"
SYSTEM_NS=datahoard-system
IMAGE=datahoard:e2e
READER_IMAGE=python:3.12-slim-bookworm
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
TRAINING_OPERATOR_REF="${TRAINING_OPERATOR_REF:-v1.9.0}"
TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/datahoard-tools}"
HELM="${HELM:-helm}"
FILES=120   # e2e/seed.yaml seeds this many files into the Dataset
DATASET=imagenet
LABEL="dataset.datahoard.io/${NS}.${DATASET}"   # datahoard.names.node_label(NS, DATASET)
export KUBECONFIG="${KUBECONFIG_E2E:-$HOME/.kube/datahoard-e2e.config}"

log() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nE2E FAILED: %s\n' "$*" >&2; exit 1; }

# 0. Tools.
if ! command -v kind >/dev/null && [[ ! -x "$TOOLS_DIR/kind-$KIND_VERSION/kind" ]] && command -v go >/dev/null; then
    log "installing kind $KIND_VERSION into $TOOLS_DIR"
    GOBIN="$TOOLS_DIR/kind-$KIND_VERSION" go install "sigs.k8s.io/kind@$KIND_VERSION"
fi
KIND="$(command -v kind || echo "$TOOLS_DIR/kind-$KIND_VERSION/kind")"
for tool in docker "$KIND" kubectl "$HELM"; do
    command -v "$tool" >/dev/null || { echo "e2e: $tool is missing" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e: the Docker engine is not reachable (docker info failed)" >&2; exit 2; }

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
finish() {
    local code=$?
    [[ $code -ne 0 ]] && diagnose
    if [[ "${E2E_KEEP:-0}" != 1 ]]; then
        "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    else
        echo "kept cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)" >&2
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
log "creating kind cluster $CLUSTER"
"$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
"$KIND" create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 180s
WORKERS=$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')
for node in $WORKERS; do
    docker exec "$node" test -c /dev/fuse || fail "/dev/fuse is missing on $node (modprobe fuse on the host)"
    # Advertise fake GPUs (an extended resource): the Dataset's default placement and the
    # examples' GPU requests then behave as on a GPU cluster.
    kubectl patch node "$node" --subresource=status --type=json -p \
        '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]' >/dev/null
done
for node in $WORKERS; do
    wait_for "fake GPUs on $node" 60 node "$node" -o 'jsonpath={.status.allocatable.nvidia\.com/gpu}' -- '^4$'
done

# 2. Images.
log "building $IMAGE and loading it into kind"
docker build -t "$IMAGE" "$REPO"
docker pull -q "$READER_IMAGE" >/dev/null
kind_load "$IMAGE"
kind_load "$READER_IMAGE"

# 3. The chart, as the README installs it.
log "installing the chart"
"$HELM" install datahoard "$REPO/charts/datahoard" --namespace "$SYSTEM_NS" --create-namespace \
    --set image.repository=datahoard --set image.tag=e2e --wait --timeout 5m \
    --set policy.capacityResource=   # kind nodes report the runner's small disk; the example asks 200Gi
kubectl -n "$SYSTEM_NS" rollout status ds/datahoard-csi-node --timeout=180s
for node in $WORKERS; do
    wait_for "the CSI driver registered on $node" 120 csinode "$node" \
        -o 'jsonpath={.spec.drivers[*].name}' -- 'csi\.datahoard\.io'
done

# 4. In-cluster S3 with the synthetic dataset.
log "starting S3 and seeding $FILES files"
kubectl apply -f "$HERE/s3.yaml"
kubectl -n minio rollout status deploy/minio --timeout=300s
kubectl apply -f "$HERE/seed.yaml"
kubectl -n minio wait --for=condition=complete job/seed --timeout=300s
kubectl -n minio logs job/seed

# 5. The Dataset, exactly as in examples/.
log "applying examples/s3-secret.yaml and examples/dataset.yaml"
kubectl create namespace "$NS"
kubectl -n "$NS" apply -f "$REPO/examples/s3-secret.yaml" -f "$REPO/examples/dataset.yaml"
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
    kubectl -n "$NS" apply -f "$REPO/examples/job.yaml"
    if ! kubectl -n "$NS" wait --for=condition=complete job/read-imagenet --timeout=300s; then
        fail "job/read-imagenet did not complete (run $run)"
    fi
    check_pod "$(kubectl -n "$NS" get pods -l job-name=read-imagenet -o jsonpath='{.items[0].metadata.name}')"
done

# 7. The PyTorchJob, when the training operator is there (or asked for).
if [[ "${E2E_TRAINING_OPERATOR:-0}" == 1 ]]; then
    log "installing the Kubeflow training operator $TRAINING_OPERATOR_REF"
    kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
    kubectl -n kubeflow rollout status deploy/training-operator --timeout=300s
fi
if kubectl get crd pytorchjobs.kubeflow.org >/dev/null 2>&1; then
    log "examples/pytorchjob.yaml"
    # The training operator's validating webhook may still refuse requests for a moment after
    # its Deployment is Available (Service endpoints, CA bundle): retry the create briefly.
    for attempt in 1 2 3 4 5 6; do
        kubectl -n "$NS" apply -f "$REPO/examples/pytorchjob.yaml" && break
        (( attempt < 6 )) || fail "could not create the PyTorchJob (training operator webhook?)"
        sleep 10
    done
    wait_for "the PyTorchJob to succeed" 600 -n "$NS" pytorchjob read-imagenet \
        -o 'jsonpath={.status.conditions[?(@.type=="Succeeded")].status}' -- '^True$'
    PODS=$(kubectl -n "$NS" get pods -l training.kubeflow.org/job-name=read-imagenet -o name)
    [[ $(wc -w <<<"$PODS") == 2 ]] || fail "expected a master and a worker pod, got: $PODS"
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
    until docker exec "$node" sh -c "test ! -e /var/lib/datahoard/cache/$NS/$DATASET && test ! -e /var/lib/datahoard/mnt/$NS/$DATASET"; do
        (( SECONDS < deadline )) || fail "cache or mount directory of $DATASET left on $node"
        sleep 3
    done
    ! docker exec "$node" grep -q "/var/lib/datahoard/mnt/$NS/$DATASET" /proc/self/mountinfo \
        || fail "a mount of $DATASET is left on $node"
done

log "uninstalling the chart"
"$HELM" uninstall datahoard --namespace "$SYSTEM_NS" --wait --timeout 3m
kubectl get crd datasets.datahoard.io >/dev/null || fail "the CRD should be kept on uninstall"

log "e2e passed"
