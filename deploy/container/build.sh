#!/usr/bin/env bash
# Build the service's image from a bento:
#
#   deploy/container/build.sh gpu   # bentofile.yaml: PyTorch (CUDA wheels) + ONNX Runtime GPU
#   deploy/container/build.sh cpu   # deploy/bentofile-cpu.yaml: ONNX Runtime only, no torch
#
# Tags localhost/$IMAGE:<variant> and localhost/$IMAGE:<bento version>-<variant>.
# Expects the models in the BentoML store (python -m training.register; make
# container does it). The base image is the standard python:3.11-slim where it can
# be pulled, else one made here from Debian's packages (deploy/container/base.sh);
# BASE_IMAGE=... picks one. Environment: BENTOML (the bentoml command), IMAGE and
# the storage settings in env.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$here/env.sh"
variant=${1:-gpu}
case "$variant" in
    gpu) bentofile="$root/bentofile.yaml" ;;
    cpu) bentofile="$root/deploy/bentofile-cpu.yaml" ;;
    *) echo "usage: $0 gpu|cpu" >&2; exit 2 ;;
esac
bentoml=${BENTOML:-bentoml}
started=$(date +%s)

tag=$("$bentoml" build -f "$bentofile" --output tag "$root" | tail -1)
tag=${tag#__tag__:}
version=${tag#*:}
echo "bento $tag"

# The standard base when it is here or can be pulled; otherwise the local one.
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
    if buildah inspect --type image "$BASE_IMAGE_STANDARD" >/dev/null 2>&1 \
        || timeout 120 buildah pull --quiet "$BASE_IMAGE_STANDARD" >/dev/null 2>&1; then
        base=$BASE_IMAGE_STANDARD
    else
        echo "cannot pull $BASE_IMAGE_STANDARD: using a base made from Debian's packages"
        base_started=$(date +%s)
        "$here/base.sh"
        echo "base image ready in $(($(date +%s) - base_started)) s"
        base=$BASE_IMAGE_LOCAL
    fi
fi
echo "base image $base"

built=localhost/$IMAGE-build:$version-$variant
# --force: the multi-stage build leaves a working container of it behind.
trap 'buildah rmi --force "$built" >/dev/null 2>&1 || true' EXIT
# BentoML's generated Dockerfile, with its first FROM replaced by the chosen base.
# The host's CA bundle is mounted for the build only (uv trusts it through the
# bentofile's UV_NATIVE_TLS). One volume: BentoML joins repeated ones into one string.
"$bentoml" containerize "$tag" --backend buildah --image-tag "$built" \
    --opt from="$base" --opt network=host \
    --opt volume="$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"

buildah build --network host --layers=false \
    --build-arg BUILT="$built" --build-arg BASE="$base" \
    --label org.opencontainers.image.title="$IMAGE" \
    --label org.opencontainers.image.version="$version-$variant" \
    --label bento="$tag" \
    -f "$here/Containerfile" -t "localhost/$IMAGE:$variant" -t "localhost/$IMAGE:$version-$variant" "$here"

echo "image localhost/$IMAGE:$variant (localhost/$IMAGE:$version-$variant)"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "localhost/$IMAGE:$version-$variant"
echo "built in $(($(date +%s) - started)) s"
