# Everything a fresh machine needs is set up by the targets that need it:
#   make demo   - the main job: a local S3 server, `datahoard mount`, two passes, the hit ratio
#   make test   - the whole test suite (unit, integration, cluster, chart and node tiers)
#   make unit   - the tier that needs no root, FUSE, network or Go (in-memory fakes, tests/support)
#   make cluster - a real one-node Kubernetes cluster on this machine (make cluster-down stops it)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Built tools (kube-apiserver, etcd, helm, ...) live outside the repo so clean checkouts reuse them.
TOOLS_DIR ?= $(HOME)/.cache/datahoard-tools

.PHONY: all native venv sysdeps test unit demo envtest bench bench-tools reliability clean helm e2e \
	node-sysdeps node-tools cluster cluster-down

all: test

# fuse3 for the FUSE view; shellcheck so the e2e scripts are linted where kind cannot run.
sysdeps:
	@command -v fusermount3 >/dev/null && command -v shellcheck >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 shellcheck; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The view's native OPEN/RELEASE responder (C, loaded with ctypes; needs only cc): every target
# that runs the worker depends on venv, so on this too.
native:
	@command -v cc >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev; }
	@cache_worker/fusell/build-native.sh

venv: $(VENV)/.installed native

# Three runs of pytest, so that tests never wait for a build they do not need:
# tests/tools/build-all.sh builds the tools made from source in the background (about half an
# hour cold on 2 cores, instant once cached) while the tests that need none of them run; then
# the tests marked `tools` but not node or e2e (cluster, chart, the plugin watcher, csi-sanity,
# the benchmark's smoke test) once its first group is built, while the node group builds; then
# the node tier and e2e. Every run runs, and the target fails if any fails.
test: sysdeps venv hdfs-minicluster node-sysdeps
	@tests/tools/build-all.sh "$(TOOLS_DIR)" --background
	@status=0; \
	$(PY) -m pytest -q -m "not tools" || status=$$?; \
	for group in first node; do \
	  if [ $$group = first ]; then marks="tools and not node and not e2e"; else marks="node or e2e"; fi; \
	  echo "make test: waiting for the $$group tools (log: $(TOOLS_DIR)/build-all.log), then: $$marks"; \
	  if tests/tools/build-all.sh "$(TOOLS_DIR)" $$group; then $(PY) -m pytest -q -m "$$marks" || status=$$?; \
	  else status=$$?; fi; \
	done; \
	exit $$status

# No root, FUSE, network or Go: the cache core, the view, the CSI node service and the operator
# run against the in-memory fakes of tests/support/fakes (each checked against the real thing
# by a contract test in the integration/cluster tiers).
unit: venv
	$(PY) -m pytest -q -m "not integration and not cluster and not e2e and not node and not chart"

demo: sysdeps venv
	$(PY) -m datahoard.demo

# etcd + kube-apiserver + kubectl for the cluster test tier, built once from Go modules into
# $(TOOLS_DIR)/envtest-<k8s version>/ (first build: ~10 min on 2 cores with a cold Go cache; later: instant).
# Prints that directory only, so `KUBEBUILDER_ASSETS=$$(make -s envtest)` works; an existing
# KUBEBUILDER_ASSETS with the three binaries is used as-is.
envtest:
	@tests/tools/build-envtest.sh "$(TOOLS_DIR)"

# The test HDFS (Hadoop's MiniDFSCluster, NameNode + DataNode with WebHDFS) fetched from Maven
# Central and compiled once into $(TOOLS_DIR)/mini-hdfs-<version>-<hash>/ (first fetch: ~45 s,
# ~90 MB; later: instant). Without a JDK it only says so: the HDFS tests then skip with that reason.
.PHONY: hdfs-minicluster
hdfs-minicluster:
	@if command -v javac >/dev/null; then tests/hdfs/build-minicluster.sh "$(TOOLS_DIR)" >/dev/null; \
	else echo "hdfs-minicluster: no JDK on PATH; the HDFS tests will be skipped"; fi

# helm for the chart tests and the e2e, built once from its Go module into $(TOOLS_DIR)/helm-<version>/
# (first build: ~5 min on 2 cores with a cold Go cache, capped at 20 min; later: instant).
# Prints the binary's path only, so `HELM=$$(make -s helm)` works; an executable $$HELM is used as-is.
helm:
	@tests/tools/build-helm.sh "$(TOOLS_DIR)"

# The whole path on a real cluster (e2e/run.sh): image, chart, S3, the example Jobs. On kind when
# a Docker engine answers (GitHub Actions), else on this machine's one-node cluster
# (tests/node/cluster.sh, E2E_PROVIDER=local). `make test` runs both where they can run.
E2E_PROVIDER ?= $(shell docker info >/dev/null 2>&1 && echo kind || echo local)
e2e: $(if $(filter local,$(E2E_PROVIDER)),venv node-tools helm)
	E2E_PROVIDER=$(E2E_PROVIDER) PYTHON="$(abspath $(PY))" HELM="$$(tests/tools/build-helm.sh "$(TOOLS_DIR)")" e2e/run.sh

# The benchmark (bench/README.md): MinIO behind a slow link vs local disk, boto3, rclone, s3fs.
# Full run ~25 min, writes bench/RESULTS.md and bench/results.json; `make bench BENCH_ARGS=--quick`
# is the couple-of-minutes smoke test. bench-tools builds MinIO once into $(TOOLS_DIR).
BENCH_ARGS ?=
bench-tools:
	@bench/build-tools.sh "$(TOOLS_DIR)"

bench: sysdeps venv bench-tools
	TOOLS_DIR="$(TOOLS_DIR)" $(PY) -m bench.run $(BENCH_ARGS)

# The load and worker-restart tests for minutes, their figures kept in bench/RESULTS.md.
reliability: sysdeps venv
	$(PY) -m bench.reliability $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# The real one-node cluster (tests/node/cluster.sh, the `node` test tier): containerd, runc and the
# CNI plugins from Debian (not started by the packages: cluster.sh starts its own containerd), plus
# what builds the images (buildah, umoci, skopeo, debootstrap, gcc for pause).
NODE_PACKAGES := containerd runc openssl curl containernetworking-plugins buildah umoci skopeo debootstrap socat conntrack iptables gcc libc6-dev
node-sysdeps:
	@dpkg-query -W -f='$${Status}\n' $(NODE_PACKAGES) 2>/dev/null | grep -c '^install ok installed$$' | grep -qx $(words $(NODE_PACKAGES)) \
	|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(NODE_PACKAGES); }

# Everything the cluster runs, built once into $(TOOLS_DIR) (cold on 2 cores, after envtest, beside
# make test's first tests: node binaries ~3 min, images ~2, training-operator ~2; later: instant).
node-tools: envtest node-sysdeps
	@tests/tools/build-node.sh "$(TOOLS_DIR)" >/dev/null
	@tests/tools/build-node-images.sh "$(TOOLS_DIR)" >/dev/null
	@tests/tools/build-training-operator.sh "$(TOOLS_DIR)" "$$(tests/tools/build-envtest.sh "$(TOOLS_DIR)")/kubectl" >/dev/null

# Bring the cluster up for a person; prints how to point kubectl at it.
cluster: node-sysdeps node-tools
	@TOOLS_DIR="$(TOOLS_DIR)" tests/node/cluster.sh up
	@echo "The cluster is up. Point kubectl at it with:"
	@echo '  eval "$$(tests/node/cluster.sh env)"; kubectl get nodes'
	@echo "Stop it with: make cluster-down"

cluster-down:
	@TOOLS_DIR="$(TOOLS_DIR)" tests/node/cluster.sh down
