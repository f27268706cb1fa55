#!/usr/bin/env bash
# Fetch Apache Hadoop's test cluster (MiniDFSCluster, from the shaded hadoop-client-minicluster
# artifacts on Maven Central) and compile tests/hdfs/minicluster/MiniHdfs.java against it, once.
#
# Usage: build-minicluster.sh TOOLS_DIR   -> prints a Java classpath that runs `MiniHdfs`.
# The result lives in TOOLS_DIR/mini-hdfs-<hadoop version>-<hash of pom + source>/, outside the
# repo, so clean checkouts and later CI runs reuse it; Maven's own cache (~/.m2) keeps the jars.
# First run: ~45 s and ~90 MB from Maven Central; later runs: instant.
set -euo pipefail

TOOLS_DIR="${1:?usage: build-minicluster.sh TOOLS_DIR}"
SRC="$(cd "$(dirname "$0")/minicluster" && pwd)"
VERSION="$(sed -n 's:.*<hadoop.version>\(.*\)</hadoop.version>.*:\1:p' "$SRC/pom.xml")"
HASH="$(cat "$SRC/pom.xml" "$SRC/MiniHdfs.java" | sha256sum | cut -c1-10)"
OUT="$TOOLS_DIR/mini-hdfs-$VERSION-$HASH"
classpath() { echo "$OUT/lib/*:$OUT/classes"; }

if [[ -f "$OUT/.done" ]]; then classpath; exit 0; fi

log() { echo "build-minicluster: $*" >&2; }
command -v javac >/dev/null || { log "needs a JDK (javac) on PATH"; exit 1; }
command -v mvn >/dev/null || { log "needs Maven (mvn) on PATH to fetch Hadoop $VERSION once"; exit 1; }
mkdir -p "$TOOLS_DIR"
# One build at a time: a concurrent test run waits instead of fetching twice.
exec 9>"$TOOLS_DIR/.mini-hdfs.lock"
flock 9
if [[ -f "$OUT/.done" ]]; then classpath; exit 0; fi

WORK="$(mktemp -d "$TOOLS_DIR/.mini-hdfs.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "fetching Hadoop $VERSION test cluster jars from Maven Central (once)"
if ! mvn -B -q -f "$SRC/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$WORK/lib" >"$WORK/mvn.log" 2>&1; then
    cat "$WORK/mvn.log" >&2
    log "Maven could not fetch Hadoop $VERSION (is Maven Central reachable? see above)"
    exit 1
fi
mkdir -p "$WORK/classes"
javac -nowarn -d "$WORK/classes" -cp "$WORK/lib/*" "$SRC/MiniHdfs.java" >&2
rm -f "$WORK/mvn.log"
touch "$WORK/.done"
rm -rf "$OUT"
mv "$WORK" "$OUT"
# Builds of older pom/source versions are never used again.
for old in "$TOOLS_DIR"/mini-hdfs-*; do [[ "$old" == "$OUT" ]] || rm -rf "$old"; done
classpath
