#!/usr/bin/env bash
# Install what building and running the image needs, from Debian, when it is missing: buildah
# (daemonless build), podman and runc (run the image), debootstrap (the stand-in base image,
# deploy/image/base.sh). Nothing is installed when every tool is already on PATH.
#
# Exit 0 when every tool is there afterwards. Exit 3, with the reason on stderr, when a tool is
# missing and cannot be installed here (not root, or no apt-get): tests/test_image.py skips then.
set -euo pipefail

# runc and debootstrap live in /usr/sbin, which is not on every user's PATH.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
declare -A package=([buildah]=buildah [podman]=podman [runc]=runc [debootstrap]=debootstrap)
missing=()
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing ${missing[*]}: install them from your distribution (as root: apt-get install" \
        "${missing[*]})" >&2
    exit 3
fi
echo "+ apt-get update && apt-get install --no-install-recommends ${missing[*]}" >&2
apt-get -q update >&2
DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends "${missing[@]}" >&2
