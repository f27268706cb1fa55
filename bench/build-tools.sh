#!/usr/bin/env bash
# Builds the benchmark's tools once into $1 (default ~/.cache/datahoard-tools) and prints nothing
# else on success:
#   minio/minio        MinIO server, from its Go module (the pinned version below; first build
#                      ~5-10 min on 2 cores, then cached)
#   latproxy/latproxy  our latency proxy (bench/latproxy, no dependencies, ~2 s)
# Debian's rclone and s3fs are installed with apt-get when missing (the peers of the benchmark).
set -euo pipefail
TOOLS_DIR=${1:-$HOME/.cache/datahoard-tools}
MINIO_VERSION=${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}
HERE=$(cd "$(dirname "$0")" && pwd)

command -v go >/dev/null || { echo "go is not installed: cannot build MinIO" >&2; exit 2; }
mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.bench-tools.lock"   # a second caller (make test's background build) waits, then finds it built
flock 9
if [ ! -x "$TOOLS_DIR/minio/minio" ]; then
  mkdir -p "$TOOLS_DIR/minio"
  echo "building MinIO $MINIO_VERSION into $TOOLS_DIR/minio (once)" >&2
  GOBIN="$TOOLS_DIR/minio" GOFLAGS=-trimpath go install "github.com/minio/minio@$MINIO_VERSION" >&2
fi
if [ ! -x "$TOOLS_DIR/latproxy/latproxy" ] || [ "$HERE/latproxy/main.go" -nt "$TOOLS_DIR/latproxy/latproxy" ]; then
  mkdir -p "$TOOLS_DIR/latproxy"
  (cd "$HERE/latproxy" && go build -o "$TOOLS_DIR/latproxy/latproxy" .) >&2
fi
missing=()
for tool in rclone s3fs; do command -v $tool >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}") >&2 \
    || echo "could not install ${missing[*]}; the benchmark will skip them" >&2
fi
