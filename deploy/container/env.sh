# Sourced by the container scripts: where images are stored and how builds run.
#
# The defaults suit a host without a container daemon and without the kernel
# features for overlay mounts or user namespaces (an unprivileged CI runner, a
# sandbox): buildah with the vfs storage driver and chroot isolation. Where
# overlay and OCI isolation work, set CONTAINER_STORAGE_DRIVER=overlay and
# BUILDAH_ISOLATION=oci.

CONTAINER_ROOT=${CONTAINER_ROOT:-/var/tmp/containers}
CONTAINER_STORAGE_DRIVER=${CONTAINER_STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
# Docker-format images keep HEALTHCHECK (the OCI image format has no such field).
export BUILDAH_FORMAT=${BUILDAH_FORMAT:-docker}

# This buildah ignores STORAGE_DRIVER; a storage.conf named by CONTAINERS_STORAGE_CONF
# is what selects the driver (and keeps the store out of any repository).
if [ -z "${CONTAINERS_STORAGE_CONF:-}" ]; then
    mkdir -p "$CONTAINER_ROOT"
    export CONTAINERS_STORAGE_CONF="$CONTAINER_ROOT/storage.conf"
    cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "$CONTAINER_STORAGE_DRIVER"
graphroot = "$CONTAINER_ROOT/storage"
runroot = "$CONTAINER_ROOT/run"
CONF
fi

# The CA bundle pip and uv must trust to reach the package index; mounted into
# every build step that downloads.
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

# Image names, shared with the Makefile and deploy/kubernetes (tests/test_deploy.py
# checks that they agree).
IMAGE=${IMAGE:-digit-sentiment-serving}
BASE_IMAGE_LOCAL=${BASE_IMAGE_LOCAL:-localhost/debian-python-venv:bookworm-3.11}
BASE_IMAGE_STANDARD=${BASE_IMAGE_STANDARD:-docker.io/library/python:3.11-slim}
