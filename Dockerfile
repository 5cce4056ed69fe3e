# Vibrato server image: `vibrato serve-v2` with the runbook's flags (docs/CONTRACT.md §7.2, runbook §1),
# on a slim Python base.
#
#   podman build --format docker -t vibrato:latest .          (docker build -t vibrato:latest . works too)
#   podman run -d -p 8080:8080 -v /srv/vibrato:/var/lib/vibrato vibrato:latest
#
# Two stages: the builder compiles the Cython/C extensions into a virtualenv at /opt/vibrato; the
# runtime stage copies that virtualenv onto the same base without any compiler. BASE_IMAGE must be
# a Debian-based image with python3 (>= 3.11): the official slim image by default, or a local one
# (scripts/smoke/container_smoke.sh makes `localhost/debian-python:bookworm` with debootstrap when no
# registry is reachable). Both stages use the same base, so the venv's interpreter path matches.
#
# Package indexes: the PIP_* build args are passed to pip in the builder only (e.g. a CA bundle
# mounted with `-v host.crt:/host-ca.crt:ro` and PIP_CERT=/host-ca.crt, or local find-links).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ARG PIP_CONSTRAINT=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180 DEBIAN_FRONTEND=noninteractive
# A C compiler always; Python headers and venv from Debian only when the base lacks them (the
# official image ships its own in /usr/local, Debian's python3 does not).
RUN set -eux; \
    pkgs="gcc libc6-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || pkgs="$pkgs python3-dev"; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs="$pkgs python3-venv"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/vibrato
WORKDIR /src
# Build dependencies first (cached while only the sources change); pins match pyproject.toml.
COPY pyproject.toml setup.py README.md ./
RUN /opt/vibrato/bin/pip install setuptools==84.2.1 cython==3.3.1 numpy==2.4.6 wheel
COPY include ./include
COPY vibrato ./vibrato
RUN /opt/vibrato/bin/pip install --no-build-isolation . \
    && /opt/vibrato/bin/pip uninstall -y cython \
    && cd / && /opt/vibrato/bin/python -c "import vibrato._native.cpu, vibrato._native.distance, vibrato._native.hnsw, vibrato._native.pq, vibrato._native.segio" \
    && find /opt/vibrato -name '__pycache__' -prune -exec rm -rf {} + \
    && /opt/vibrato/bin/vibrato --version

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="vibrato" \
      org.opencontainers.image.description="Vibrato vector database for audio embeddings (serve-v2)"
RUN set -eux; \
    if command -v useradd >/dev/null; then \
        useradd --system --uid 10001 --user-group --home-dir /var/lib/vibrato --no-create-home --shell /usr/sbin/nologin vibrato; \
    else \
        echo 'vibrato:x:10001:10001::/var/lib/vibrato:/usr/sbin/nologin' >> /etc/passwd; echo 'vibrato:x:10001:' >> /etc/group; \
    fi; \
    mkdir -p /var/lib/vibrato; chown 10001:10001 /var/lib/vibrato; chmod 0750 /var/lib/vibrato
COPY --from=builder /opt/vibrato /opt/vibrato
ENV PATH=/opt/vibrato/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/vibrato
VOLUME ["/var/lib/vibrato"]
EXPOSE 8080
# Live (not ready): recovery of a large data dir must not get the container killed. 401 means the
# server answers with --public-health-metrics false, which is alive too.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request, urllib.error\ntry:\n    urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=4)\nexcept urllib.error.HTTPError as e:\n    sys.exit(0 if e.code == 401 else 1)\nexcept Exception:\n    sys.exit(1)"]
ENTRYPOINT ["vibrato"]
CMD ["serve-v2", "--data-dir", "/var/lib/vibrato", "--collection", "default", "--dim", "128", "--port", "8080", \
     "--host", "0.0.0.0", "--checkpoint-interval-secs", "30", "--compaction-interval-secs", "180", \
     "--orphan-ttl-hours", "168", "--audio-colocated", "true", "--public-health-metrics", "true", \
     "--bootstrap-admin-key", "true"]
