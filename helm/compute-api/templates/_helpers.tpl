{{/* Chart name, overridable. */}}
{{- define "compute-api.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "compute-api.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "compute-api.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels (app.kubernetes.io/*) on every object. */}}
{{- define "compute-api.labels" -}}
helm.sh/chart: {{ include "compute-api.chart" . }}
{{ include "compute-api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: compute-api
{{- end }}

{{- define "compute-api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "compute-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the API pods. */}}
{{- define "compute-api.apiSelectorLabels" -}}
{{ include "compute-api.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{/* The image every role runs; the tag defaults to appVersion. */}}
{{- define "compute-api.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "compute-api.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "compute-api.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* DaskCluster name: <base>-<hash of its spec>. The operator rolls no change of a DaskCluster's
pod specs out (it acts on creation and on spec.worker.replicas only), so a changed image or pod spec
must be a new cluster: this name changes with the spec (replicas excepted) and an upgrade brings the
new cluster up beside the old one (upgrade path: _daskcluster.tpl, daskcluster-retiring.yaml). The
operator derives <name>-scheduler and <name>-default and caps names at 53. With dask.cells N > 1
there are N identical clusters, <base>-c<i>-<hash> (service/cells.py places requests on them). */}}
{{- define "compute-api.daskClusterNames" -}}
{{- $cells := int .Values.dask.cells }}
{{- $base := default (include "compute-api.fullname" .) .Values.dask.clusterName | trunc (ternary 44 40 (eq $cells 1)) | trimSuffix "-" }}
{{- $spec := include "compute-api.daskClusterSpec" (dict "root" . "name" "NAME" "replicas" 0) }}
{{- /* hashed as data, so an edited comment or a reordered key is not a new cluster */}}
{{- $hash := $spec | fromYaml | toJson | sha256sum | trunc 8 }}
{{- $names := list }}
{{- if eq $cells 1 }}
{{- $names = list (printf "%s-%s" $base $hash) }}
{{- else }}
{{- range $i := until $cells }}
{{- $names = append $names (printf "%s-c%d-%s" $base $i $hash) }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The first (with dask.cells 1, the only) DaskCluster's name. */}}
{{- define "compute-api.daskClusterName" -}}
{{- include "compute-api.daskClusterNames" . | fromJsonArray | first }}
{{- end }}

{{- define "compute-api.daskProtocol" -}}
{{- if .Values.dask.tls.enabled }}tls{{ else }}tcp{{ end }}
{{- end }}

{{/* The scheduler Service the operator creates for a DaskCluster (port tcp-comm, 8786). */}}
{{- define "compute-api.schedulerAddressOf" -}}
{{- printf "%s://%s-scheduler.%s.svc.%s:8786" (include "compute-api.daskProtocol" .root) .name .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/* The current DaskClusters' schedulers, comma-separated: where the API sends its work. */}}
{{- define "compute-api.schedulerAddresses" -}}
{{- $addresses := list }}
{{- range $name := include "compute-api.daskClusterNames" . | fromJsonArray }}
{{- $addresses = append $addresses (include "compute-api.schedulerAddressOf" (dict "root" $ "name" $name)) }}
{{- end }}
{{- join "," $addresses }}
{{- end }}

{{/* The release's scheduler / worker pods, whichever DaskCluster they belong to (during an upgrade,
the old one still drains): the operator copies the DaskCluster's labels onto its pods and the role's
metadata adds the component. Used by NetworkPolicies and PodMonitors. */}}
{{- define "compute-api.schedulerPodLabels" -}}
{{ include "compute-api.selectorLabels" . }}
app.kubernetes.io/component: scheduler
{{- end }}

{{- define "compute-api.workerPodLabels" -}}
{{ include "compute-api.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/* Pod-level securityContext: Pod Security Standards "restricted". */}}
{{- define "compute-api.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
fsGroup: {{ .Values.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext: restricted, read-only root (writes go to the /tmp emptyDir). */}}
{{- define "compute-api.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Dask TLS settings for one role (scheduler, worker or client), as container env entries.
dask.config reads DASK_DISTRIBUTED__COMM__TLS__* into distributed.comm.tls.*.
*/}}
{{- define "compute-api.daskTlsEnv" -}}
{{- if .context.Values.dask.tls.enabled }}
- name: DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION
  value: "True"
- name: DASK_DISTRIBUTED__COMM__TLS__CA_FILE
  value: /etc/dask/tls/ca.crt
- name: DASK_DISTRIBUTED__COMM__TLS__{{ upper .role }}__CERT
  value: /etc/dask/tls/tls.crt
- name: DASK_DISTRIBUTED__COMM__TLS__{{ upper .role }}__KEY
  value: /etc/dask/tls/tls.key
{{- end }}
{{- end }}

{{/* Volumes every pod needs: a writable /tmp (read-only root) and, with TLS, the certificates. */}}
{{- define "compute-api.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.dask.tls.enabled }}
- name: dask-tls
  secret:
    secretName: {{ required "dask.tls.secretName is required when dask.tls.enabled" .Values.dask.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "compute-api.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.dask.tls.enabled }}
- name: dask-tls
  mountPath: /etc/dask/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Seconds the API pod may take to stop: must exceed preStop sleep + graceful shutdown. */}}
{{- define "compute-api.terminationGracePeriodSeconds" -}}
{{- add .Values.api.preStopSleepSeconds .Values.api.gracefulShutdownTimeout .Values.api.terminationGraceMarginSeconds }}
{{- end }}

{{/*
Requests and limits with every quantity rendered as a string. The DaskCluster CRD types them as
strings (its PodSpec schema), so an unquoted `cpu: 2` from `--set` would be refused by the API
server after the release's other objects were applied. Helm reads numbers from values files as
float64: whole numbers are rendered without an exponent (536870912, not 5.36870912e+08).
*/}}
{{- define "compute-api.resources" -}}
{{- range $kind, $quantities := . }}
{{ $kind }}:
  {{- range $name, $quantity := $quantities }}
  {{ $name }}: {{ include "compute-api.quantity" $quantity }}
  {{- end }}
{{- end }}
{{- end }}

{{/* One quantity as a quoted string (see compute-api.resources). */}}
{{- define "compute-api.quantity" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ . | int64 | toString | quote }}{{ else }}{{ . | toString | quote }}{{ end }}
{{- end }}

{{/* Admit the metrics scraper's namespace to a pod's metrics port (networkPolicy.metricsScraperNamespace). */}}
{{- define "compute-api.scraperIngress" -}}
{{- with .context.Values.networkPolicy.metricsScraperNamespace }}
- from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ . }}
  ports:
    - port: {{ $.port }}
      protocol: TCP
{{- end }}
{{- end }}

{{/* The fields every scrape endpoint shares (ServiceMonitor endpoints, PodMonitor
podMetricsEndpoints). */}}
{{- define "compute-api.scrapeEndpoint" -}}
path: /metrics
interval: {{ .Values.monitoring.interval }}
scrapeTimeout: {{ .Values.monitoring.scrapeTimeout }}
{{- with .Values.monitoring.metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Monitors that the release's own NetworkPolicies would block are a silent trap: refuse them. */}}
{{- define "compute-api.monitoringReachable" -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.metricsScraperNamespace) }}
{{- fail "monitoring.enabled: set networkPolicy.metricsScraperNamespace to your Prometheus's namespace (the NetworkPolicies would block its scrapes), or set networkPolicy.enabled=false" }}
{{- end }}
{{- end }}
