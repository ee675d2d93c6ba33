#!/usr/bin/env bash
# Installs every system tool the test suite needs: podman + runc + debootstrap (image build and smoke
# runs), the CNI dnsname plugin (containers on a user-defined podman network resolve each other by
# name/alias; podman 4.3 uses CNI here), shellcheck (script lint), nginx (local ingress stand-in),
# uidmap/slirp4netns/fuse-overlayfs (podman networking and storage), then helm via install-helm.sh. Idempotent: apt-get runs only when a
# tool is missing, and it fails loudly when it is not root and something is missing.
set -euo pipefail

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# command-or-absolute-path-to-check:debian-package
requirements=(
    podman:podman
    runc:runc
    debootstrap:debootstrap
    /usr/lib/cni/dnsname:golang-github-containernetworking-plugin-dnsname
    openssl:openssl
    shellcheck:shellcheck
    nginx:nginx
    newuidmap:uidmap
    slirp4netns:slirp4netns
    fuse-overlayfs:fuse-overlayfs
    prometheus:prometheus
)

missing=()
for pair in "${requirements[@]}"; do
    check="${pair%%:*}"
    package="${pair#*:}"
    if [[ "$check" == /* ]]; then
        [ -e "$check" ] || missing+=("$package")
    # nginx and newuidmap live in sbin, which is not always on a non-root PATH.
    elif ! command -v "$check" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$check" ] && [ ! -x "/sbin/$check" ]; then
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-tools.sh: missing packages: ${missing[*]}" >&2
        echo "run as root, or: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

"$scripts_dir/install-helm.sh"
