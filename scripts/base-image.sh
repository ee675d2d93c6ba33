#!/usr/bin/env bash
# Builds a minimal Debian bookworm image with Python 3.11 (localhost/python-base:bookworm) with
# debootstrap, for machines that cannot pull the official python:3.11-slim-bookworm from a registry.
# Idempotent: does nothing when the image already exists. Needs root (debootstrap) and podman.
set -euo pipefail

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${PYTHON_BASE_IMAGE:-localhost/python-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$scripts_dir/containers.conf}"

if podman image exists "$image"; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "base-image.sh: debootstrap needs root; run as root or pull an official Python image instead" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || "$scripts_dir/install-podman.sh"

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"
# Shrink the layer: package lists and caches are useless in an image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image"
