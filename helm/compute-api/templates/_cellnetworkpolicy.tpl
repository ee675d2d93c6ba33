{{/*
A cell's own NetworkPolicies: its workers talk only to their own scheduler and to each other, its
scheduler admits the API and its own workers, and its workers' comm port admits the API (which
fetches results from them). Pods are selected by the labels the operator itself
puts on them (controller.py l.87-88 scheduler, l.146-148 workers: dask.org/cluster-name +
dask.org/component), so they hold for any DaskCluster, including a retiring one whose labels an older
revision wrote. NetworkPolicies add up (a connection is allowed if any policy selecting the pod allows
it): the release-wide policies (networkpolicy.yaml) therefore admit nothing between schedulers and
workers, or a worker could reach every cell's scheduler. Takes root, name (the DaskCluster) and
retiring (labels the policies of a cluster the upgrade path retires).
*/}}
{{- define "compute-api.cellSelector" -}}
dask.org/cluster-name: {{ .name }}
dask.org/component: {{ .component }}
{{- end }}

{{- define "compute-api.cellNetworkPolicies" -}}
{{- $name := .name }}
{{- $retiring := .retiring }}
{{- with .root }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $name }}-scheduler-peers
  labels:
    {{- include "compute-api.labels" . | nindent 4 }}
    app.kubernetes.io/component: scheduler
    dask.org/cluster-name: {{ $name }}
    {{- if $retiring }}
    compute-api/retiring: "true"
    {{- end }}
spec:
  podSelector:
    matchLabels:
      {{- include "compute-api.cellSelector" (dict "name" $name "component" "scheduler") | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    # 8786 executes whatever it is sent: the API (every cell's client) and this cell's workers only.
    - from:
        - podSelector:
            matchLabels:
              {{- include "compute-api.apiSelectorLabels" . | nindent 14 }}
        - podSelector:
            matchLabels:
              {{- include "compute-api.cellSelector" (dict "name" $name "component" "worker") | nindent 14 }}
      ports:
        - port: tcp-comm
          protocol: TCP
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $name }}-worker-peers
  labels:
    {{- include "compute-api.labels" . | nindent 4 }}
    app.kubernetes.io/component: worker
    dask.org/cluster-name: {{ $name }}
    {{- if $retiring }}
    compute-api/retiring: "true"
    {{- end }}
spec:
  podSelector:
    matchLabels:
      {{- include "compute-api.cellSelector" (dict "name" $name "component" "worker") | nindent 6 }}
  policyTypes:
    - Ingress
    {{- if .Values.networkPolicy.workerEgress.enabled }}
    - Egress
    {{- end }}
  ingress:
    # This cell's scheduler and workers (data transfer between workers) only.
    - from:
        - podSelector:
            matchLabels:
              {{- include "compute-api.cellSelector" (dict "name" $name "component" "scheduler") | nindent 14 }}
        - podSelector:
            matchLabels:
              {{- include "compute-api.cellSelector" (dict "name" $name "component" "worker") | nindent 14 }}
      ports:
        - port: tcp-worker
          protocol: TCP
        - port: tcp-nanny
          protocol: TCP
        - port: http-dashboard
          protocol: TCP
    # The API fetches each result from the worker that holds it (distributed.client.direct-to-workers
    # in service/dask.yaml), so the scheduler does not relay it: the worker's comm port only.
    - from:
        - podSelector:
            matchLabels:
              {{- include "compute-api.apiSelectorLabels" . | nindent 14 }}
      ports:
        - port: tcp-worker
          protocol: TCP
  {{- if .Values.networkPolicy.workerEgress.enabled }}
  egress:
    - to:
        - podSelector:
            matchLabels:
              {{- include "compute-api.cellSelector" (dict "name" $name "component" "scheduler") | nindent 14 }}
      ports:
        - port: 8786
          protocol: TCP
    - to:
        - podSelector:
            matchLabels:
              {{- include "compute-api.cellSelector" (dict "name" $name "component" "worker") | nindent 14 }}
      ports:
        - port: 8788
          protocol: TCP
        - port: 8789
          protocol: TCP
  {{- end }}
{{- end }}
{{- end }}
