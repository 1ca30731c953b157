#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image where Docker Hub cannot be reached:
# a Debian trixie root filesystem with Python (debootstrap --variant=minbase), imported into the
# local container storage under the exact name the Dockerfile's FROM uses, so that
# deploy/image/build.sh (make image) builds the real Dockerfile on it.
#
# The stand-in has Debian's Python 3.13 in /usr/bin instead of the official image's own build in
# /usr/local/bin; the image built on it has the same layout (/opt/ksz-proxy) and behaviour. Where
# Docker Hub is reachable, skip this: the build pulls the real base.
#
#   deploy/image/base.sh            import the stand-in unless the current one is there
#
# Needs root (debootstrap). Not root: exit 0 if an image of that name is in the local storage
# (a real base, pulled), else exit 3 with the reason.
#
# The Debian mirror is the one this machine's apt uses (KSZ_DEBIAN_MIRROR overrides it). The
# root filesystem is cached as a tarball in ${XDG_CACHE_HOME:-~/.cache}/ksz-proxy/base (about
# 50 MB), keyed by the recipe below: a rerun with a warm cache only imports it (seconds).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin # debootstrap

SUITE=trixie
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase
# Bump when the way the root filesystem is made changes: it is part of the cache key.
RECIPE="1 $SUITE minbase $PACKAGES"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
[ -n "$BASE" ] || { echo "Dockerfile: no ARG BASE_IMAGE=..." >&2; exit 1; }
# The fully qualified name a short FROM name resolves to (docker.io/library/<name>).
case "$BASE" in
    */*/*) NAME=$BASE ;;
    */*) NAME=docker.io/$BASE ;;
    *) NAME=docker.io/library/$BASE ;;
esac
CACHE=${KSZ_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ksz-proxy}/base
TARBALL=$CACHE/$SUITE-minbase-$KEY.tar.gz

if [ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "ksz-proxy.stand-in"}}' \
    "$NAME" 2>/dev/null || true)" = "$KEY" ]; then
    echo "stand-in $NAME ($KEY) is already in the local storage"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    # debootstrap needs root; a base already in this user's storage (pulled) is used as it is.
    if buildah inspect --type image "$NAME" >/dev/null 2>&1; then
        echo "not root: using $NAME as found in the local storage"
        exit 0
    fi
    echo "not root: the stand-in for $NAME needs root (debootstrap); pull the real base" \
        "(podman pull $BASE) or run as root" >&2
    exit 3
fi

# The mirror of the machine's own apt sources: the first Debian archive it lists.
debian_mirror() {
    if [ -n "${KSZ_DEBIAN_MIRROR:-}" ]; then
        echo "$KSZ_DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(apt-get indextargets --format '$(REPO_URI)' 'Identifier: Packages' 'Origin: Debian' \
        'Label: Debian' 2>/dev/null | head -n 1)
    if [ -z "$uri" ]; then
        # No release files fetched yet (no apt-get update): take the URI that names the archive.
        uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI)' \
            'Identifier: Packages' 2>/dev/null | grep -E '/debian/?$' | head -n 1 || true)
    fi
    [ -n "$uri" ] || {
        echo "no Debian mirror in this machine's apt sources: set KSZ_DEBIAN_MIRROR" >&2
        exit 1
    }
    echo "$uri"
}

if [ ! -s "$TARBALL" ]; then
    mkdir -p "$CACHE"
    MIRROR=$(debian_mirror)
    ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$ROOTFS" "$TARBALL.part"' EXIT
    echo "+ debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || {
        tail -n 30 "$CACHE/debootstrap.log" >&2
        exit 1
    }
    # What the official slim images leave out too: package caches, lists, documentation.
    rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
        "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*
    find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
        -exec rm -rf {} +
    tar --numeric-owner --xattrs -C "$ROOTFS" -c . | gzip -1 >"$TARBALL.part"
    mv "$TARBALL.part" "$TARBALL"
    rm -rf "$ROOTFS"
    trap - EXIT
fi

echo "+ buildah from scratch; add $TARBALL; commit $NAME"
CTR=$(buildah from scratch)
trap 'buildah rm "$CTR" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$CTR" "$TARBALL" / >/dev/null
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label "ksz-proxy.stand-in=$KEY" \
    --label "ksz-proxy.stand-in.recipe=debootstrap --variant=minbase $SUITE ($PACKAGES)" \
    "$CTR"
buildah commit --quiet --format docker --rm "$CTR" "$NAME" >/dev/null
trap - EXIT
echo "stand-in $NAME ($KEY) imported"
