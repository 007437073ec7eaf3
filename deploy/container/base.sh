#!/usr/bin/env bash
# Make the local base image (BASE_IMAGE_LOCAL) from Debian's packages, unless it exists.
#
#   deploy/container/base.sh            # needs root, debootstrap, podman and buildah
#
# DEBIAN_MIRROR defaults to the first Debian mirror in this host's apt sources.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"

if buildah inspect --type image "$BASE_IMAGE_LOCAL" >/dev/null 2>&1; then
    echo "base image $BASE_IMAGE_LOCAL exists"
    exit 0
fi

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {uri=$2} /^Suites:/ && / bookworm( |$)/ && uri {print uri; exit}')
fi
if [ -z "$mirror" ]; then
    mirror=$(grep -hE '^deb +[^ ]+ +bookworm( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        2>/dev/null | awk '{print $2; exit}')
fi
: "${mirror:?no Debian bookworm mirror in the apt sources; set DEBIAN_MIRROR}"

rootfs=$(mktemp -d "$CONTAINER_ROOT/rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
# passwd: useradd for the image's non-root user.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# mktemp made the directory 0700, and the tar archives its mode as the image's /:
# every user but root would then be refused every path.
chmod 0755 "$rootfs"
rootfs_image=localhost/debian-rootfs:bookworm
tar -C "$rootfs" -c . | podman --storage-driver "$CONTAINER_STORAGE_DRIVER" import - "$rootfs_image" >/dev/null
rm -rf "$rootfs"
buildah build --network host --build-arg ROOTFS="$rootfs_image" \
    -f "$here/Containerfile.base" -t "$BASE_IMAGE_LOCAL" "$here"
buildah rmi "$rootfs_image" >/dev/null
echo "base image $BASE_IMAGE_LOCAL: $(buildah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE_LOCAL" 2>/dev/null || true)"
