# syntax=docker/dockerfile:1
# One image for every Datahoard component (see datahoard/entrypoint.py):
#   operator | worker | csi-node
# Build: docker build -t datahoard:dev .      (e2e/run.sh does this and loads it into kind)
#
# Stage 1 builds a virtualenv from pinned wheels (requirements.lock, checked against
# pyproject.toml by tests/chart/test_image.py); stage 2 is the runtime: the venv, FUSE 3
# userspace, nothing else. Root by default, because the cache worker (FUSE mounts) and the CSI
# plugin (bind mounts) need it; the chart runs the operator as uid 65532 with a read-only root.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/datahoard
ENV PATH=/opt/datahoard/bin:$PATH
# Dependencies first, so source edits do not rebuild this layer.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-deps --only-binary=:all: -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY datahoard /src/datahoard
COPY operator /src/operator
COPY cache_worker /src/cache_worker
COPY csi_node /src/csi_node
# The view's native OPEN/RELEASE responder (cache_worker/fusell/fastopen.c), installed as package
# data; the compiler stays in this stage. libc6-dev is pinned to the base's own libc6.
RUN libc="$(dpkg-query -W -f='${Version}' libc6)" \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc=4:12.2.0-3 libc6-dev=$libc \
    && rm -rf /var/lib/apt/lists/* \
    && /src/cache_worker/fusell/build-native.sh
# --no-deps: everything it needs is already pinned above; `pip check` proves the set is whole.
RUN pip install --no-deps /src && pip check

FROM ${PYTHON_IMAGE}
# fuse3: fusermount3 (mounts by non-root users; the worker speaks the FUSE protocol itself, see
# cache_worker/fusell); util-linux: mount/umount for cleanup jobs.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fuse3=3.14.0-4 libfuse3-3=3.14.0-4 \
    && rm -rf /var/lib/apt/lists/* \
    # Pods of other users read the FUSE view (mounted with allow_other).
    && echo user_allow_other >> /etc/fuse.conf \
    && groupadd --gid 65532 datahoard \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin datahoard
COPY --from=build /opt/datahoard /opt/datahoard
ENV PATH=/opt/datahoard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Smoke test in the runtime stage: every component imports.
RUN datahoard --help >/dev/null \
    && kopf --help >/dev/null \
    && python -c "import datahoard.operator.handlers, datahoard.csi_node.server, datahoard.cache_worker.worker" \
    && python -c "from datahoard.cache_worker.fusell import fastopen; assert fastopen.load(), fastopen.unavailable" \
    && datahoard-entrypoint csi-node --help >/dev/null
LABEL org.opencontainers.image.title="datahoard" \
      org.opencontainers.image.description="Datahoard operator, cache worker and CSI node plugin" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["datahoard-entrypoint"]
CMD []
