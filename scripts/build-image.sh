#!/usr/bin/env bash
# Builds the compute-api image with podman.
#   scripts/build-image.sh [TAG]            TAG defaults to localhost/compute-api:<version from pyproject.toml>
# Environment:
#   PYTHON_IMAGE  base image; by default the official python:3.11-slim-bookworm when it can be pulled,
#                 else localhost/python-base:bookworm built by base-image.sh
#   REQUIREMENTS  lock file to install (default requirements.lock; the Locust image uses a lock that
#                 includes the `loadtest` extra, see LOADTEST=1)
#   LOADTEST=1    build the Locust image (TAG default ...:<version>-loadtest) from requirements-loadtest.lock,
#                 or from requirements-dev.lock while the former does not exist
# Builds share the host network and trust store so pip reaches the package index from inside the build.
set -euo pipefail

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$scripts_dir/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$scripts_dir/containers.conf}"
official_image="python:3.11-slim-bookworm"

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo_root/pyproject.toml" | head -n 1)"
requirements="${REQUIREMENTS:-requirements.lock}"
suffix=""
if [ "${LOADTEST:-0}" = "1" ]; then
    suffix="-loadtest"
    if [ -z "${REQUIREMENTS:-}" ]; then
        requirements="requirements-loadtest.lock"
        [ -f "$repo_root/$requirements" ] || requirements="requirements-dev.lock"
    fi
fi
tag="${1:-localhost/compute-api:${version}${suffix}}"

command -v podman >/dev/null 2>&1 || "$scripts_dir/install-podman.sh"

if [ -z "${PYTHON_IMAGE:-}" ]; then
    if podman image exists "$official_image" \
        || timeout 60 podman pull --quiet "docker.io/library/$official_image" >/dev/null 2>&1; then
        PYTHON_IMAGE="$official_image"
    else
        echo "build-image.sh: cannot pull $official_image; using a debootstrap base" >&2
        "$scripts_dir/base-image.sh"
        PYTHON_IMAGE="${PYTHON_BASE_IMAGE:-localhost/python-base:bookworm}"
    fi
fi

podman build \
    --network host \
    --volume /etc/ssl/certs:/etc/ssl/certs:ro \
    --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
    --build-arg "REQUIREMENTS=$requirements" \
    --tag "$tag" \
    --file "$repo_root/Dockerfile" \
    "$repo_root" >&2
echo "$tag"
