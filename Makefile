# Everything a fresh machine needs is set up by the targets that need it:
#   make demo   - the main job: a local S3 server, `datahoard mount`, two passes, the hit ratio
#   make test   - the whole test suite (unit, integration, cluster tiers)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Built tools (kube-apiserver, etcd, helm, ...) live outside the repo so clean checkouts reuse them.
TOOLS_DIR ?= $(HOME)/.cache/datahoard-tools

.PHONY: all venv sysdeps test unit demo envtest bench clean

all: test

sysdeps:
	@command -v fusermount3 >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: sysdeps venv envtest
	$(PY) -m pytest -q

unit: venv
	$(PY) -m pytest -q -m "not integration and not cluster and not e2e"

demo: sysdeps venv
	$(PY) -m datahoard.demo

# etcd + kube-apiserver + kubectl for the cluster test tier, built once from Go modules into
# $(TOOLS_DIR)/envtest-<k8s version>/ (first build: ~10 min on 2 cores with a cold Go cache; later: instant).
# Prints that directory only, so `KUBEBUILDER_ASSETS=$$(make -s envtest)` works; an existing
# KUBEBUILDER_ASSETS with the three binaries is used as-is.
envtest:
	@tests/tools/build-envtest.sh "$(TOOLS_DIR)"

clean:
	rm -rf $(VENV) build *.egg-info
