#!/bin/sh
# Builds the view's native OPEN/RELEASE responder (fastopen.c) next to its source, where
# fastopen.py loads it. Run by `make` (every target that runs the worker) and by the Dockerfile.
# Needs a C compiler and libc headers only (no Python headers: it is loaded with ctypes).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/_fastopen.so"
[ "$out" -nt "$here/fastopen.c" ] && [ "$out" -nt "$0" ] && exit 0
${CC:-cc} -O2 -Wall -Wextra -Werror -shared -fPIC -pthread -o "$out.tmp" "$here/fastopen.c"
mv "$out.tmp" "$out"
