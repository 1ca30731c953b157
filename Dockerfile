# syntax=docker/dockerfile:1
#
# ksz-proxy container image. Build it with `make image` (buildah), or by hand, from the
# repository root (docs/container.md has the details):
#
#   VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' proxy/__init__.py)
#   docker build -t "ksz-proxy:$VERSION" --build-arg VERSION="$VERSION" .
#   buildah bud --format docker -t "ksz-proxy:$VERSION" --build-arg VERSION="$VERSION" .
#   podman build --format docker -t "ksz-proxy:$VERSION" --build-arg VERSION="$VERSION" .
#
# buildah and podman build OCI images by default, and the OCI format has no HEALTHCHECK: they
# drop it silently unless given `--format docker`. VERSION labels the image and must be the
# package's version (proxy/__init__.py): the build refuses any other, so the label cannot
# disagree with the code; without it the label says "unknown".
# Behind a TLS-inspecting proxy or with a private package index, add
#   --build-arg PIP_INDEX_URL=https://pypi.example/simple --secret id=pip-ca,src=/path/to/ca.pem
# (the CA bundle is mounted for the pip step only and never stored in a layer).
#
#   docker run --read-only --tmpfs /tmp:size=4m --cap-drop ALL \
#     --security-opt no-new-privileges --stop-timeout 30 \
#     -v ./ksz-proxy.toml:/etc/ksz-proxy/ksz-proxy.toml:ro \
#     --ulimit nofile=4096:4096 --ulimit nproc=512:512 \
#     -v ./secrets:/run/secrets:ro "ksz-proxy:$VERSION"
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
# Pin the digest in your own build: --build-arg BASE_IMAGE=python:3.13-slim-trixie@sha256:...
ARG BASE_IMAGE=python:3.13-slim-trixie

FROM ${BASE_IMAGE} AS build
# The package index (the image's own pip default when empty); a CA bundle for it comes in as the
# build secret pip-ca. Credentials do not belong in the URL: build arguments are recorded.
ARG PIP_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Everything installed is pinned with hashes: the build backend (requirements-build.lock, into a
# throw-away build environment) and the runtime dependencies (requirements.lock, into
# /opt/ksz-proxy). --only-binary: the runtime stage has no compiler, so nothing is built from
# source. The locks come first so that this layer stays cached while only the code changes.
COPY requirements.lock requirements-build.lock ./
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && if [ -n "$PIP_INDEX_URL" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi \
    && python -m venv /opt/build \
    && /opt/build/bin/python -m pip install --require-hashes --only-binary=:all: --no-deps \
       -r requirements-build.lock \
    && python -m venv --without-pip /opt/ksz-proxy \
    && /opt/build/bin/python -m pip --python /opt/ksz-proxy/bin/python install \
       --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The wheel is built offline with the locked backend; `pip check` proves the lock satisfies the
# package's own requirements. VERSION (the label below), when given, must be the package's.
ARG VERSION=
RUN /opt/build/bin/python -m pip wheel --no-build-isolation --no-deps --no-index \
       --wheel-dir /dist . \
    && /opt/build/bin/python -m pip --python /opt/ksz-proxy/bin/python install --no-deps \
       --no-index /dist/*.whl \
    && /opt/build/bin/python -m pip --python /opt/ksz-proxy/bin/python check \
    && actual="$(/opt/ksz-proxy/bin/ksz-proxy --version)" \
    && if [ -n "$VERSION" ] && [ "$actual" != "ksz-proxy $VERSION" ]; then \
         echo "--build-arg VERSION=$VERSION but the package says: $actual" >&2; exit 1; \
       fi

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="ksz-proxy" \
      org.opencontainers.image.description="Local authenticating sidecar for the KSZ-BCSS REST APIs (OAuth2 client credentials with a JWT client assertion)." \
      org.opencontainers.image.version="${VERSION:-unknown}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# operator chowns the mounted key files to it. It is a system account above the system range:
# -K raises the range's top for this one call, which quiets useradd's SYS_UID_MAX warning.
RUN groupadd --system --gid 10001 -K SYS_GID_MAX=10001 ksz-proxy \
    && useradd --system --uid 10001 --gid 10001 -K SYS_UID_MAX=10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin ksz-proxy

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
