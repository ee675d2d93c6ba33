#!/usr/bin/env bash
# The kind recipe: a local Kubernetes cluster running compute-api end to end, for a user with Docker.
#   scripts/kind-up.sh            create/reuse the kind cluster, install ingress-nginx and the
#                                 dask-kubernetes operator, build and load the image, install the
#                                 chart (or INSTALL=kustomize: k8s/overlays/kind), smoke-test
#                                 http://127.0.0.1/ through the ingress and run `helm test`.
# Environment: KIND_CLUSTER_NAME (compute-api), NAMESPACE (compute-api; kustomize needs compute-api),
#   INSTALL (helm|kustomize), LOADTEST=1 also builds/loads the Locust image and applies k8s/locust,
#   INGRESS_NGINX_VERSION (controller-v1.12.1).
# Tear down: kind delete cluster --name compute-api
set -euo pipefail

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$scripts_dir/.." && pwd)"
cluster="${KIND_CLUSTER_NAME:-compute-api}"
namespace="${NAMESPACE:-compute-api}"
install_mode="${INSTALL:-helm}"
ingress_nginx_version="${INGRESS_NGINX_VERSION:-controller-v1.12.1}"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo_root/pyproject.toml" | head -n 1)"
image="compute-api:$version"

for tool in docker kind kubectl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "kind-up.sh: $tool is required (https://kind.sigs.k8s.io/docs/user/quick-start/)" >&2
        exit 1
    fi
done
helm_bin="$("$scripts_dir/install-helm.sh")"
if [ "$install_mode" = kustomize ] && [ "$namespace" != compute-api ]; then
    echo "kind-up.sh: k8s/overlays/kind is rendered for namespace compute-api; use INSTALL=helm for $namespace" >&2
    exit 1
fi

echo "==> kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
    kind create cluster --name "$cluster" --config "$repo_root/k8s/kind-cluster.yaml" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null

echo "==> ingress-nginx $ingress_nginx_version"
kubectl apply -f "https://raw.githubusercontent.com/kubernetes/ingress-nginx/$ingress_nginx_version/deploy/static/provider/kind/deploy.yaml"
kubectl wait --namespace ingress-nginx --for=condition=ready pod \
    --selector=app.kubernetes.io/component=controller --timeout=300s

echo "==> dask-kubernetes operator"
# A fixed release name (the README's --generate-name creates a new release on every run).
"$helm_bin" upgrade --install dask-kubernetes-operator dask-kubernetes-operator \
    --repo https://helm.dask.org --namespace dask-operator --create-namespace --wait --timeout 5m

echo "==> image $image"
docker build --tag "$image" "$repo_root"
kind load docker-image "$image" --name "$cluster"
if [ "${LOADTEST:-0}" = "1" ]; then
    # Locust comes from the `loadtest` extra's lock (the dev lock, a superset, until it exists).
    loadtest_lock=requirements-loadtest.lock
    [ -f "$repo_root/$loadtest_lock" ] || loadtest_lock=requirements-dev.lock
    docker build --tag "$image-loadtest" --build-arg "REQUIREMENTS=$loadtest_lock" "$repo_root"
    kind load docker-image "$image-loadtest" --name "$cluster"
fi

echo "==> compute-api ($install_mode) in namespace $namespace"
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$namespace" --overwrite pod-security.kubernetes.io/enforce=restricted
if [ "$install_mode" = kustomize ]; then
    kubectl apply -k "$repo_root/k8s/overlays/kind"
else
    "$helm_bin" upgrade --install compute-api "$repo_root/helm/compute-api" --namespace "$namespace" \
        --values "$repo_root/helm/compute-api/ci/kind-values.yaml" --set "image.tag=$version"
fi
# Not the DaskCluster's status.phase: the operator (2026.3.0) writes Pending after Running can have
# been written and may leave it Pending for good (dask/dask-kubernetes#968). What means ready is
# the scheduler pod's readiness, then the API's rollout (an API pod is ready once it can compute).
# The release's scheduler, whatever the hash in its DaskCluster's name (the chart's upgrade path).
scheduler_pods="app.kubernetes.io/instance=compute-api,app.kubernetes.io/component=scheduler"
for _ in $(seq 1 60); do
    if kubectl --namespace "$namespace" get pods --selector "$scheduler_pods" --output name | grep -q .; then
        break
    fi
    sleep 5
done
kubectl --namespace "$namespace" wait pods --selector "$scheduler_pods" --for=condition=Ready --timeout=300s
kubectl --namespace "$namespace" rollout status deployment/compute-api --timeout=300s
if [ "${LOADTEST:-0}" = "1" ]; then
    kubectl apply -k "$repo_root/k8s/locust"
fi

echo "==> smoke test through the ingress (http://127.0.0.1/)"
for attempt in $(seq 1 60); do
    if curl --fail --silent --show-error --max-time 30 http://127.0.0.1/fast \
        && curl --fail --silent --show-error --max-time 60 http://127.0.0.1/fib/25; then
        echo
        break
    fi
    if [ "$attempt" -eq 60 ]; then
        echo "kind-up.sh: the API did not answer through the ingress" >&2
        exit 1
    fi
    sleep 5
done
if [ "$install_mode" = helm ]; then
    "$helm_bin" test compute-api --namespace "$namespace" --logs
fi
kubectl --namespace "$namespace" get daskcluster,daskworkergroup,daskautoscaler,pods,ingress
echo "==> ready: curl http://127.0.0.1/fib/30"
