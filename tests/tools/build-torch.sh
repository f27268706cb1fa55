#!/usr/bin/env bash
# PyTorch for the node tier's PyTorchJob, once: torch and its dependencies installed with
# `pip install --target` into TOOLS_DIR/torch-<version>-cp311, which the job's pod mounts
# read-only (hostPath) and puts on PYTHONPATH. The job runs the product image, whose Python is
# 3.11 (Debian bookworm), hence cp311 wheels whatever Python runs this script.
#
# Why this shape: the CPU-only wheel index (download.pytorch.org) is not reachable here, and
# PyPI's torch for Linux is the CUDA build, which needs ~20 nvidia-*/cuda-* wheels to import
# even on a CPU. Measured on 2 cores: 2.8 GB downloaded in 59 s, installed in 62 s, 5.3 GB on
# disk; this script cold took 4 min while other builds ran. Layering that into the image instead
# would copy it three more times (buildah's vfs layer, the docker-archive tarball, containerd's
# snapshot) for every product-image rebuild.
#
# Usage: build-torch.sh TOOLS_DIR   -> prints the directory to put on PYTHONPATH.
set -euo pipefail

VERSION="${TORCH_VERSION:-2.15.0}"
TOOLS_DIR="${1:?usage: build-torch.sh TOOLS_DIR}"
OUT="$TOOLS_DIR/torch-$VERSION-cp311"
done_() { [[ -f "$OUT/.complete" ]]; }
if done_; then echo "$OUT"; exit 0; fi

mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.torch.lock"
flock 9
if done_; then echo "$OUT"; exit 0; fi
PYTHON="${PYTHON:-python3}"
T0=$SECONDS
echo "build-torch: installing torch==$VERSION for CPython 3.11 into $OUT (once; ~2.8 GB from PyPI)" >&2
rm -rf "$OUT.tmp"
# pip does not widen an explicit --platform to older glibc tags: name every manylinux tag the
# wheels use, up to bookworm's glibc 2.36.
PLATFORMS=()
for v in 5 12 17 18 24 25 26 27 28 31 34 35 36; do PLATFORMS+=(--platform "manylinux_2_${v}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
nice -n 10 "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-cache-dir --target "$OUT.tmp" \
    --python-version 3.11 --implementation cp --abi cp311 "${PLATFORMS[@]}" \
    --only-binary=:all: "torch==$VERSION" >&2
touch "$OUT.tmp/.complete"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "build-torch: done in $((SECONDS - T0)) s" >&2
echo "$OUT"
