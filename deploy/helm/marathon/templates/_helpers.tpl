{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "marathon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "marathon.fullname" -}}
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

{{- define "marathon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marathon.labels" -}}
helm.sh/chart: {{ include "marathon.chart" . }}
{{ include "marathon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "marathon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marathon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one role's objects; call with (dict "root" $ "role" "api"). */}}
{{- define "marathon.roleLabels" -}}
{{ include "marathon.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "marathon.roleSelectorLabels" -}}
{{ include "marathon.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/* Name of one role's objects: the full name for role all, else full name + role. */}}
{{- define "marathon.roleName" -}}
{{- if eq .role "all" }}
{{- include "marathon.fullname" .root }}
{{- else }}
{{- printf "%s-%s" (include "marathon.fullname" .root | trunc 56 | trimSuffix "-") .role }}
{{- end }}
{{- end }}

{{/* The roles deployed, as a space-separated list. */}}
{{- define "marathon.roles" -}}
{{- if .Values.roles.split }}api worker{{ else }}all{{ end }}
{{- end }}

{{/* The role whose pods serve the /v1 API behind the main Service. */}}
{{- define "marathon.apiRole" -}}
{{- if .Values.roles.split }}api{{ else }}all{{ end }}
{{- end }}

{{- define "marathon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "marathon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "marathon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "marathon.redisSecretName" -}}
{{- default (printf "%s-redis" (include "marathon.fullname" .)) .Values.store.redis.existingSecret }}
{{- end }}

{{- define "marathon.redisSecretKey" -}}
{{- if .Values.store.redis.existingSecret }}{{ .Values.store.redis.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{- define "marathon.authSecretName" -}}
{{- default (printf "%s-auth" (include "marathon.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "marathon.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}tokens{{ end }}
{{- end }}

{{/* Seconds Kubernetes waits after SIGTERM before SIGKILL. */}}
{{- define "marathon.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int .Values.shutdownGraceSeconds) (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/*
Refuses combinations the server cannot run (also rejected by values.schema.json
where JSON Schema can express them).
*/}}
{{- define "marathon.validate" -}}
{{- $v := .Values }}
{{- if not (has $v.store.kind (list "memory" "redis")) }}
{{- fail (printf "store.kind must be memory or redis, not %q" $v.store.kind) }}
{{- end }}
{{- if not (has $v.queue.kind (list "memory" "sqs")) }}
{{- fail (printf "queue.kind must be memory or sqs, not %q" $v.queue.kind) }}
{{- end }}
{{- if eq $v.store.kind "memory" }}
{{- if $v.roles.split }}
{{- fail "store.kind=memory cannot be used with roles.split=true: the memory store is not shared between processes; use store.kind=redis" }}
{{- end }}
{{- if or (ne (int $v.roles.all.replicas) 1) $v.roles.all.autoscaling.enabled }}
{{- fail (printf "store.kind=memory needs exactly one replica (roles.all.replicas=%v, autoscaling.enabled=%v): the memory store is not shared; use store.kind=redis" $v.roles.all.replicas $v.roles.all.autoscaling.enabled) }}
{{- end }}
{{- end }}
{{- if and $v.roles.split (eq $v.queue.kind "memory") }}
{{- fail "queue.kind=memory cannot be used with roles.split=true: api pods would enqueue where no worker reads; use queue.kind=sqs" }}
{{- end }}
{{- if eq $v.queue.kind "memory" }}
{{- /* The memory queue is this pod's alone: its workers must serve the default task queue. */}}
{{- $default := index $v.config "engine.default_task_queue" | default "default" | toString }}
{{- $served := list "default" }}
{{- with $v.workerQueues }}
{{- $served = list }}
{{- range . }}{{ $served = append $served .name }}{{ end }}
{{- end }}
{{- if not (has $default $served) }}
{{- fail (printf "queue.kind=memory: the engine's default task queue %q is not in workerQueues (%s); no other process reads the memory queue, so the server refuses to start: add it to workerQueues" $default (join ", " $served)) }}
{{- end }}
{{- end }}
{{- if and (eq $v.store.kind "redis") (not $v.store.redis.url) (not $v.store.redis.existingSecret) }}
{{- fail "store.kind=redis needs store.redis.url or store.redis.existingSecret" }}
{{- end }}
{{- if and (eq $v.store.kind "redis") $v.store.redis.clusterNodesSecretKey (not $v.store.redis.existingSecret) }}
{{- fail (printf "store.redis.clusterNodesSecretKey=%s needs store.redis.existingSecret holding that key: the Secret the chart makes holds only url, so the pod could not start" $v.store.redis.clusterNodesSecretKey) }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.tokens) (not $v.auth.existingSecret) }}
{{- fail "auth.enabled=true needs auth.tokens or auth.existingSecret" }}
{{- end }}
{{- $managed := list "server.listen" "server.role" "server.auth_tokens" "server.shutdown_grace_ms" "worker.shutdown_grace_ms" "worker.queues" "log.filter" "log.format" "store.kind" "store.url" "store.cluster_nodes" "store.key_prefix" "store.shards" "store.retention" "queue.kind" "queue.queue_prefix" "queue.create_if_missing" "queue.max_receives" "queue.fifo" "queue.region" "queue.endpoint_url" }}
{{- range $key, $_ := $v.config }}
{{- if or (has $key $managed) (hasPrefix "queue.queue_urls." $key) }}
{{- fail (printf "config.%s is set by the chart from its own values; use those instead" $key) }}
{{- end }}
{{- end }}
{{- range $role := splitList " " (include "marathon.roles" .) }}
{{- $a := (index $v.roles $role).autoscaling }}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "roles.%s.autoscaling: minReplicas %v is above maxReplicas %v; the API server refuses such a HorizontalPodAutoscaler" $role $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and (eq $v.store.kind "redis") (gt (int $v.store.redis.shards) 16384) }}
{{- fail (printf "store.redis.shards %v is more than 16384 (the hash slots of a Redis Cluster); the server refuses it" $v.store.redis.shards) }}
{{- end }}
{{- if lt (int $v.shutdownGraceSeconds) 1 }}
{{- fail "shutdownGraceSeconds must be at least 1" }}
{{- end }}
{{- if and $v.otel.enabled (le (int $v.terminationGraceMarginSeconds) 5) }}
{{- fail (printf "terminationGraceMarginSeconds %v leaves no room for the span flush at exit (up to 5 s after the drain) with otel.enabled: the pod would be killed while it flushes; use at least 6" $v.terminationGraceMarginSeconds) }}
{{- end }}
{{- end }}

{{/* A value as the server reads it from the environment. */}}
{{- define "marathon.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else if kindIs "bool" . }}{{ ternary "true" "false" . }}{{ else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}{{ int64 . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* The container's environment for one role; call with (dict "root" $ "role" "api"). */}}
{{- define "marathon.env" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
- name: MARATHON_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $v.port) | quote }}
- name: MARATHON_ROLE
  value: {{ .role | quote }}
- name: MARATHON_LOG
  value: {{ $v.log.filter | quote }}
- name: MARATHON_LOG__FORMAT
  value: {{ $v.log.format | quote }}
- name: MARATHON_SERVER__SHUTDOWN_GRACE_MS
  value: {{ mul (int $v.shutdownGraceSeconds) 1000 | quote }}
- name: MARATHON_WORKER__SHUTDOWN_GRACE_MS
  value: {{ mul (int $v.shutdownGraceSeconds) 1000 | quote }}
{{- if $v.auth.enabled }}
- name: MARATHON_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "marathon.authSecretName" $root }}
      key: {{ include "marathon.authSecretKey" $root }}
{{- end }}
- name: MARATHON_STORE__KIND
  value: {{ $v.store.kind | quote }}
{{- if eq $v.store.kind "redis" }}
- name: MARATHON_STORE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "marathon.redisSecretName" $root }}
      key: {{ include "marathon.redisSecretKey" $root }}
      {{- if $v.store.redis.clusterNodesSecretKey }}
      {{- /* Cluster mode reads the seed nodes; the Secret need not hold a url. */}}
      optional: true
      {{- end }}
{{- with $v.store.redis.clusterNodesSecretKey }}
- name: MARATHON_STORE__CLUSTER_NODES
  valueFrom:
    secretKeyRef:
      name: {{ include "marathon.redisSecretName" $root }}
      key: {{ . }}
{{- end }}
- name: MARATHON_STORE__KEY_PREFIX
  value: {{ $v.store.redis.keyPrefix | quote }}
- name: MARATHON_STORE__SHARDS
  value: {{ int $v.store.redis.shards | quote }}
{{- if gt (int64 $v.store.redis.retentionMs) 0 }}
- name: MARATHON_STORE__RETENTION
  value: {{ int64 $v.store.redis.retentionMs | quote }}
{{- end }}
{{- end }}
- name: MARATHON_QUEUE__KIND
  value: {{ $v.queue.kind | quote }}
{{- if eq $v.queue.kind "sqs" }}
{{- $q := $v.queue.sqs }}
- name: MARATHON_QUEUE__QUEUE_PREFIX
  value: {{ $q.queuePrefix | quote }}
{{- range $name, $url := $q.queueUrls }}
- name: {{ printf "MARATHON_QUEUE__QUEUE_URLS__%s" (upper $name) }}
  value: {{ $url | quote }}
{{- end }}
- name: MARATHON_QUEUE__CREATE_IF_MISSING
  value: {{ ternary "true" "false" $q.createIfMissing | quote }}
- name: MARATHON_QUEUE__MAX_RECEIVES
  value: {{ int $q.maxReceives | quote }}
- name: MARATHON_QUEUE__FIFO
  value: {{ ternary "true" "false" $q.fifo | quote }}
{{- if $q.region }}
- name: MARATHON_QUEUE__REGION
  value: {{ $q.region | quote }}
{{- end }}
{{- if $q.endpointUrl }}
- name: MARATHON_QUEUE__ENDPOINT_URL
  value: {{ $q.endpointUrl | quote }}
{{- end }}
{{- end }}
{{- with $v.workerQueues }}
- name: MARATHON_WORKER__QUEUES
  value: {{ include "marathon.tomlQueues" . | quote }}
{{- end }}
{{- range $key, $value := $v.config }}
- name: {{ printf "MARATHON_%s" (upper (replace "." "__" $key)) }}
  value: {{ include "marathon.envValue" $value | quote }}
{{- end }}
{{- if $v.otel.enabled }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ default (include "marathon.fullname" $root) $v.otel.serviceName | quote }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" (printf "service.version=%s" (default $root.Chart.AppVersion $v.image.tag)) (printf "marathon.role=%s" .role) }}
{{- range $k, $val := $v.otel.resourceAttributes }}
{{- /* Values are percent-encoded where OTEL_RESOURCE_ATTRIBUTES needs it: the binary decodes them. */}}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $val | replace "%" "%25" | replace "," "%2C" | replace "=" "%3D")) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.samplerArg | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* workerQueues as the TOML array the server reads from MARATHON_WORKER__QUEUES. */}}
{{- define "marathon.tomlQueues" -}}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (printf "{name=%s,concurrency=%d,receivers=%d}" (.name | toJson) (int .concurrency) (int (.receivers | default 1))) }}
{{- end }}
{{- printf "[%s]" (join "," $items) }}
{{- end }}
