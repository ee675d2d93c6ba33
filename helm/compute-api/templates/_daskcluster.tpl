{{/*
The DaskCluster's spec, given its name and worker replicas. The operator acts on a DaskCluster's
creation and on spec.worker.replicas only (controller.py ~l.340 and ~l.628): later edits to its pod
specs reach no pod. So the cluster is named after a hash of this spec (see daskClusterName): a
changed image or pod spec is a new DaskCluster beside the old one, and replicas are left out of the
hash because the operator does act on them.
*/}}
{{- define "compute-api.daskClusterSpec" -}}
{{- $name := .name }}
{{- $replicas := .replicas }}
{{- with .root }}
{{- $worker := .Values.dask.worker }}
{{- $protocol := include "compute-api.daskProtocol" . }}
# Non-zero deletes an idle cluster: this cluster is a permanent service.
idleTimeout: 0
scheduler:
  metadata:
    labels:
      app.kubernetes.io/component: scheduler
      {{- with .Values.dask.scheduler.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.dask.scheduler.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    automountServiceAccountToken: false
    enableServiceLinks: false
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- include "compute-api.podSecurityContext" . | nindent 6 }}
    containers:
      - name: scheduler
        image: {{ include "compute-api.image" . | quote }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        command:
          - dask
          - scheduler
          - --protocol
          - {{ $protocol }}
          - --port
          - "8786"
          - --dashboard-address
          - :8787
        env:
          # The HTTP API (off by default) is what the DaskAutoscaler polls for adaptive_target and
          # uses to retire workers gracefully. This variable replaces the whole list, so it repeats
          # distributed's defaults (health, prometheus, ...) and adds distributed.http.scheduler.api.
          - name: DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES
            value: '["distributed.http.scheduler.prometheus", "distributed.http.scheduler.info", "distributed.http.scheduler.json", "distributed.http.health", "distributed.http.proxy", "distributed.http.statics", "distributed.http.scheduler.api"]'
          # adaptive_target = occupancy / target-duration, computed here on the scheduler.
          - name: DASK_DISTRIBUTED__ADAPTIVE__TARGET_DURATION
            value: {{ .Values.dask.scheduler.targetDuration | quote }}
          # Without workers a task would otherwise wait forever.
          - name: DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT
            value: {{ .Values.dask.scheduler.noWorkersTimeout | quote }}
          # A worker pod replaced after a node failure keeps its Deployment's name, and the
          # scheduler refuses a name that is still registered until worker-ttl (default 5 min)
          # expires the old one: keep it short so the replacement is accepted promptly.
          - name: DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL
            value: {{ .Values.dask.scheduler.workerTTL | quote }}
          {{- with include "compute-api.daskTlsEnv" (dict "context" . "role" "scheduler") }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with .Values.dask.scheduler.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        ports:
          - name: tcp-comm
            containerPort: 8786
            protocol: TCP
          - name: http-dashboard
            containerPort: 8787
            protocol: TCP
        # Probe ports are strings in the CRD (dk#778): use the port names.
        readinessProbe:
          httpGet:
            path: /health
            port: http-dashboard
          periodSeconds: 5
        livenessProbe:
          httpGet:
            path: /health
            port: http-dashboard
          initialDelaySeconds: 10
          periodSeconds: 10
          timeoutSeconds: 5
          failureThreshold: 6
        resources:
          {{- include "compute-api.resources" .Values.dask.scheduler.resources | trim | nindent 10 }}
        securityContext:
          {{- include "compute-api.containerSecurityContext" . | nindent 10 }}
        volumeMounts:
          {{- include "compute-api.volumeMounts" . | nindent 10 }}
    volumes:
      {{- include "compute-api.volumes" . | nindent 6 }}
    {{- with .Values.dask.scheduler.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.dask.scheduler.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.dask.scheduler.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.dask.scheduler.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
  # Used verbatim by the operator: it needs the explicit selector and looks the ports up by name.
  service:
    type: ClusterIP
    selector:
      dask.org/cluster-name: {{ $name }}
      dask.org/component: scheduler
    ports:
      - name: tcp-comm
        port: 8786
        targetPort: tcp-comm
        protocol: TCP
      - name: http-dashboard
        port: 8787
        targetPort: http-dashboard
        protocol: TCP
worker:
  replicas: {{ $replicas }}
  metadata:
    labels:
      app.kubernetes.io/component: worker
      {{- with $worker.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $worker.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    automountServiceAccountToken: false
    enableServiceLinks: false
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- include "compute-api.podSecurityContext" . | nindent 6 }}
    containers:
      - name: worker
        image: {{ include "compute-api.image" . | quote }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        command:
          - dask
          - worker
          - $(DASK_SCHEDULER_ADDRESS)
          # The operator injects DASK_WORKER_NAME but dask worker does not read it: without
          # --name, scale-down cannot map retired workers to their Deployments (dk#855).
          - --name
          - $(DASK_WORKER_NAME)
          - --nthreads
          - {{ $worker.nthreads | toString | quote }}
          - --nworkers
          - "1"
          - --memory-limit
          - {{ include "compute-api.quantity" (default $worker.resources.limits.memory $worker.memoryLimit) }}
          - --protocol
          - {{ $protocol }}
          # Fixed ports so the NetworkPolicy can name them.
          - --worker-port
          - "8788"
          - --nanny-port
          - "8789"
          - --dashboard-address
          - :8787
          - --local-directory
          - /tmp
        env:
          # Set explicitly (the operator only injects it when absent, always as tcp://).
          - name: DASK_SCHEDULER_ADDRESS
            value: {{ include "compute-api.schedulerAddressOf" (dict "root" . "name" $name) | quote }}
          - name: DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT
            value: {{ $worker.connectTimeout | quote }}
          # The nanny restarts the worker at this fraction of --memory-limit (the container's
          # limit by default). distributed's 0.95 leaves too little room between two of the
          # nanny's checks for a fast-growing task: the kernel's OOM killer would come first.
          - name: DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE
            value: {{ $worker.memoryTerminateFraction | toString | quote }}
          {{- with include "compute-api.daskTlsEnv" (dict "context" . "role" "worker") }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with $worker.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        ports:
          - name: http-dashboard
            containerPort: 8787
            protocol: TCP
          - name: tcp-worker
            containerPort: 8788
            protocol: TCP
          - name: tcp-nanny
            containerPort: 8789
            protocol: TCP
        livenessProbe:
          httpGet:
            path: /health
            port: http-dashboard
          initialDelaySeconds: 10
          periodSeconds: 10
          timeoutSeconds: 5
          failureThreshold: 6
        resources:
          {{- include "compute-api.resources" $worker.resources | trim | nindent 10 }}
        securityContext:
          {{- include "compute-api.containerSecurityContext" . | nindent 10 }}
        volumeMounts:
          {{- include "compute-api.volumeMounts" . | nindent 10 }}
    volumes:
      {{- include "compute-api.volumes" . | nindent 6 }}
    {{- with $worker.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $worker.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $worker.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $worker.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
The release's older DaskClusters, each re-applied as it is with idleTimeout set, so the operator
deletes it once drained. Takes live (DaskCluster objects as the API server returns them), current
(this revision's cluster names, one per cell), release and idleTimeout. Clusters already being deleted are left
alone; a rollback to a cluster that still exists makes it current again (idleTimeout 0).
*/}}
{{- define "compute-api.retiringClusters" -}}
{{- $retiring := include "compute-api.retiringClusterNames" . | fromJsonArray }}
{{- range $cluster := .live }}
{{- $meta := $cluster.metadata }}
{{- if has $meta.name $retiring }}
---
apiVersion: kubernetes.dask.org/v1
kind: DaskCluster
metadata:
  name: {{ $meta.name }}
  labels:
    {{- toYaml (set (deepCopy ($meta.labels | default dict)) "compute-api/retiring" "true") | nindent 4 }}
spec:
  {{- toYaml (set (deepCopy $cluster.spec) "idleTimeout" (int $.idleTimeout)) | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The names of the release's older DaskClusters that are still draining (same arguments as
retiringClusters): their cells' NetworkPolicies stay until the cluster is gone. */}}
{{- define "compute-api.retiringClusterNames" -}}
{{- $names := list }}
{{- range $cluster := .live }}
{{- $meta := $cluster.metadata }}
{{- $owner := get ($meta.annotations | default dict) "meta.helm.sh/release-name" }}
{{- if and (eq $owner $.release) (not (has $meta.name $.current)) (not $meta.deletionTimestamp) }}
{{- $names = append $names $meta.name }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}
