#!/usr/bin/env bash
# Build the container image with buildah (no daemon), and its SBOM next to it (`make image`).
#
#   deploy/image/build.sh [buildah bud options]
#       -> image ksz-proxy:<version> in the local container storage,
#          SBOM dist/ksz-proxy-<version>.cdx.json
#
# Options given are added after this script's own (make image IMAGE_ARGS='...'), for example
# --build-arg BASE_IMAGE=python:3.13-slim-trixie@sha256:... to build on a pinned base.
#
# --format docker: buildah's default OCI format has no HEALTHCHECK and would drop it silently.
# --isolation chroot: RUN steps need no container runtime, user namespaces or cgroups.
#
# How this machine's pip reaches the package index is passed on to the build, as a partner behind
# a TLS-inspecting proxy would: the index URL (PIP_INDEX_URL, else pip's index-url setting) as a
# build argument, the CA bundle (KSZ_PIP_CA, else PIP_CERT, else pip's cert setting) as the build
# secret pip-ca. Nothing of either is written into the image.
#
# Environment: VENV (the project's virtual environment, for cyclonedx-py and pip's settings),
# KSZ_IMAGE (the tag, default ksz-proxy:<version>), KSZ_IMAGE_DIST (where the SBOM goes, dist).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' proxy/__init__.py)
[ -n "$VERSION" ] || { echo "proxy/__init__.py: no __version__" >&2; exit 1; }
IMAGE=${KSZ_IMAGE:-ksz-proxy:$VERSION}
DIST=${KSZ_IMAGE_DIST:-dist}
SBOM=$DIST/ksz-proxy-$VERSION.cdx.json

# The value pip itself would use for option $2 (cert, index-url): the environment variable $1,
# else the last of pip's configuration files that sets it (`pip config list` lists them in
# pip's order of precedence; `pip config get` reads only one file).
pip_setting() {
    local value=${!1:-}
    if [ -z "$value" ]; then
        value=$("$BIN/python" -m pip config list 2>/dev/null \
            | sed -n "s/^\(global\|install\|:env:\)\.$2='\(.*\)'\$/\2/p" | tail -n 1)
    fi
    echo "$value"
}

args=(
    --format docker
    --isolation chroot
    --layers
    --force-rm # a failed build leaves no working container behind either
    --tag "$IMAGE"
    --build-arg "VERSION=$VERSION"
    --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    # The commit's time, not the build's: rebuilding the same commit gives the same label.
    --build-arg "CREATED=$(git log -1 --format=%cI 2>/dev/null || echo unknown)"
)
index=$(pip_setting PIP_INDEX_URL index-url)
case "$index" in
    # Only an index the build can reach: a local file:// index is not inside the build.
    http://* | https://*) args+=(--build-arg "PIP_INDEX_URL=$index") ;;
esac
ca=${KSZ_PIP_CA:-$(pip_setting PIP_CERT cert)}
if [ -n "$ca" ]; then
    [ -r "$ca" ] || { echo "CA bundle $ca is not readable" >&2; exit 1; }
    args+=(--secret "id=pip-ca,src=$ca")
fi

args+=("$@")

echo "+ buildah bud ${args[*]} ."
start=$(date +%s)
buildah bud "${args[@]}" . || {
    echo "buildah bud failed. Where Docker Hub is out of reach, \`make image-base\` first makes a" \
        "stand-in for the base image (docs/container.md)." >&2
    exit 1
}
echo "built $IMAGE in $(($(date +%s) - start)) s"
# Earlier builds of this image that the new one untagged: remove them (the layer cache stays).
stale=$(buildah images --quiet --filter dangling=true \
    --filter label=org.opencontainers.image.title=ksz-proxy)
[ -z "$stale" ] || buildah rmi $stale >/dev/null || true

# The SBOM of the image's Python environment: exactly what requirements.lock pins (the build
# installs it with --require-hashes), with ksz-proxy itself as the described component.
mkdir -p "$DIST"
# (Its warning about the root component's missing dependencies is answered just below.)
PYTHONWARNINGS=ignore::UserWarning "$BIN/cyclonedx-py" requirements \
    --pyproject pyproject.toml \
    --mc-type application \
    --output-reproducible \
    --output-format JSON \
    --output-file "$SBOM" \
    requirements.lock
# The package's version is dynamic, so cyclonedx-py leaves it out: name it, and make the locked
# packages the described component's dependencies.
"$BIN/python" - "$SBOM" "$VERSION" <<'EOF'
import json, sys

path, version = sys.argv[1:]
with open(path, encoding="utf-8") as fh:
    bom = json.load(fh)
root = bom["metadata"]["component"]
root.update(version=version, purl=f"pkg:pypi/ksz-proxy@{version}")
refs = [c["bom-ref"] for c in bom["components"]]
bom["dependencies"] = [{"ref": root["bom-ref"], "dependsOn": refs}] + [
    d for d in bom.get("dependencies", []) if d["ref"] != root["bom-ref"]
]
with open(path, "w", encoding="utf-8") as fh:
    json.dump(bom, fh, indent=2)
    fh.write("\n")
EOF
echo "image: $IMAGE ($(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE"))"
echo "SBOM:  $SBOM"
