# syntax=docker/dockerfile:1
#
# ksz-proxy container image.
#
#   docker build -t ksz-proxy:0.1.0 --build-arg VERSION=0.1.0 .
#   docker run --read-only --tmpfs /tmp:size=4m --cap-drop ALL \
#     --security-opt no-new-privileges --stop-timeout 30 \
#     -v ./ksz-proxy.toml:/etc/ksz-proxy/ksz-proxy.toml:ro \
#     -v ./secrets:/run/secrets:ro ksz-proxy:0.1.0
#
# The image runs with a read-only root filesystem. The only file `ksz-proxy run` writes is a
# private temporary copy of the mTLS key, for an instant, when upstream.client_certificate is
# true (Python's ssl module loads keys from files only): give it a tmpfs /tmp.
#
# Two stages: the first builds the ksz-proxy wheel and installs it, with its dependencies as
# binary wheels only, into a virtual environment at /opt/ksz-proxy; the second copies that
# environment onto the same slim Python base. The final image has no compiler, no pip in the
# environment, and no configuration or key material: mount the config at
# /etc/ksz-proxy/ksz-proxy.toml and the keystore and its password wherever the config names them
# (files mode 0400 or 0600, owned by UID 10001: ksz-proxy refuses group- or world-readable keys).
#
# Where the proxy listens (the `[listen]` section of the mounted config, not this image):
# - sidecar sharing the application's network namespace (a Kubernetes pod, or compose
#   `network_mode: service:...`): keep listen.host = "127.0.0.1". Only processes in that
#   namespace can call it, and anyone who can call it acts with the partner's authority at KSZ.
# - application in another container: listen.host = "0.0.0.0" is then needed, together with
#   listen.shared_secret_file and listen.allowed_hosts naming the service; prefer the sidecar.
# The admin listener (health, readiness, metrics; no secrets) may bind 0.0.0.0 where probes or
# Prometheus come from outside the namespace; the HEALTHCHECK below runs inside the container,
# so 127.0.0.1 reaches it either way.

# Both stages must use the same base: the virtual environment is copied between them.
# Pin the digest (python:3.13-slim-trixie@sha256:...) in your own build.
ARG BASE_IMAGE=python:3.13-slim-trixie

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The .dockerignore lets only these into the build context.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# --only-binary: the runtime stage has no compiler, so nothing may be built from source.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv --without-pip /opt/ksz-proxy \
    && python -m pip --python /opt/ksz-proxy/bin/python install --only-binary=:all: /dist/*.whl \
    && /opt/ksz-proxy/bin/ksz-proxy --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="ksz-proxy" \
      org.opencontainers.image.description="Local authenticating sidecar for the KSZ-BCSS REST APIs (OAuth2 client credentials with a JWT client assertion)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.13-slim-trixie"

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# operator chowns the mounted key files to it.
RUN groupadd --system --gid 10001 ksz-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ksz-proxy

COPY --from=build /opt/ksz-proxy /opt/ksz-proxy

# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (pip compiled the bytecode at
# install time). The config is mounted, never baked in.
ENV PATH=/opt/ksz-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KSZ_PROXY_CONFIG=/etc/ksz-proxy/ksz-proxy.toml

USER 10001:10001
WORKDIR /

# 8080: proxy listener (loopback in the sidecar pattern); 9090: admin (/livez /readyz /health
# /metrics).
EXPOSE 8080 9090

# SIGTERM: readiness turns 503 and in-flight requests drain for listen.drain_timeout_s (20 s by
# default), so give the container a longer stop timeout (docker stop -t 30,
# terminationGracePeriodSeconds > 20). SIGHUP reloads the credentials.
STOPSIGNAL SIGTERM

# /livez on the admin port, without curl: urllib with proxies disabled (an HTTP_PROXY in the
# environment must not catch a loopback probe). Set KSZ_PROXY_HEALTHCHECK_URL when [admin]
# uses another port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; url = os.environ.get('KSZ_PROXY_HEALTHCHECK_URL', 'http://127.0.0.1:9090/livez'); sys.exit(0 if u.build_opener(u.ProxyHandler({})).open(url, timeout=4).status == 200 else 1)"]

CMD ["ksz-proxy", "run"]
