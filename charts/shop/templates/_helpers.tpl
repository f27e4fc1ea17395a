{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "shop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, plus the chart name unless it already has it. */}}
{{- define "shop.fullname" -}}
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

{{- define "shop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's resources: (dict "root" $ "component" "gateway"). */}}
{{- define "shop.componentName" -}}
{{- printf "%s-%s" (include "shop.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. helm.sh/chart changes with each chart version, so it is never used in selectors. */}}
{{- define "shop.labels" -}}
helm.sh/chart: {{ include "shop.chart" .root }}
{{ include "shop.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "shop.name" .root }}
{{- end }}

{{/* Stable labels: what Services, Deployments, PDBs and NetworkPolicies select on. */}}
{{- define "shop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shop.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* image reference: (dict "root" $ "image" .image) */}}
{{- define "shop.image" -}}
{{- $registry := .root.Values.image.registry | trimSuffix "/" }}
{{- $repo := ternary .image.repository (printf "%s/%s" $registry .image.repository) (empty $registry) }}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" $repo $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* In-cluster base URL of a component: (dict "root" $ "component" "product") */}}
{{- define "shop.url" -}}
{{- $c := index .root.Values.components .component }}
{{- printf "http://%s:%d" (include "shop.componentName" .) (int $c.service.port) }}
{{- end }}

{{/* The services that own a database. */}}
{{- define "shop.dbServices" -}}
product order user
{{- end }}

{{/* Secret and key holding a service's DATABASE_URL: (dict "root" $ "component" "product") */}}
{{- /* The Secret with the token signing key (generated unless auth.existingSecret). */}}
{{- define "shop.jwtSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-jwt" (include "shop.fullname" .)) }}
{{- end }}

{{- define "shop.databaseSecretName" -}}
{{- if .root.Values.postgresql.enabled }}
{{- index .root.Values.postgresql.existingSecrets .component | default (printf "%s-database" (include "shop.componentName" .)) }}
{{- else }}
{{- $ext := index .root.Values.externalDatabase .component }}
{{- $ext.existingSecret | default (printf "%s-database" (include "shop.componentName" .)) }}
{{- end }}
{{- end }}

{{- define "shop.databaseSecretKey" -}}
{{- if .root.Values.postgresql.enabled }}
{{- "database-url" }}
{{- else }}
{{- $ext := index .root.Values.externalDatabase .component }}
{{- ternary $ext.existingSecretKey "database-url" (not (empty $ext.existingSecret)) }}
{{- end }}
{{- end }}

{{/* The services that publish or consume events (AMQP_URL). */}}
{{- define "shop.brokerServices" -}}
product order user
{{- end }}

{{/* Secret and key holding the services' AMQP_URL. */}}
{{- define "shop.brokerSecretName" -}}
{{- if .Values.rabbitmq.enabled }}
{{- .Values.rabbitmq.existingSecret | default (printf "%s-rabbitmq" (include "shop.fullname" .)) }}
{{- else }}
{{- .Values.externalBroker.existingSecret | default (printf "%s-broker" (include "shop.fullname" .)) }}
{{- end }}
{{- end }}

{{- define "shop.brokerSecretKey" -}}
{{- if and (not .Values.rabbitmq.enabled) .Values.externalBroker.existingSecret }}
{{- .Values.externalBroker.existingSecretKey }}
{{- else }}
{{- "amqp-url" }}
{{- end }}
{{- end }}

{{/* Seconds Kubernetes waits before SIGKILL: longer than everything the pod does on the way out. */}}
{{- define "shop.terminationGracePeriod" -}}
{{- $s := .Values.shutdown }}
{{- add $s.preStopSeconds $s.delaySeconds $s.timeoutSeconds $s.marginSeconds }}
{{- end }}

{{- define "shop.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "shop.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A component's non-secret environment (its ConfigMap), from the values that the binaries read. */}}
{{- define "shop.env" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v.components .component }}
{{- $env := dict
    "HOST" "0.0.0.0"
    "PORT" (toString $c.port)
    "SHUTDOWN_DELAY" (printf "%ds" (int $v.shutdown.delaySeconds))
    "SHUTDOWN_TIMEOUT" (printf "%ds" (int $v.shutdown.timeoutSeconds))
    "RUST_LOG" $v.logging.level
    "LOG_FORMAT" $v.logging.format
    "OTEL_SERVICE_NAME" .component
    "OTEL_EXPORTER_OTLP_PROTOCOL" $v.otel.protocol
    "OTEL_TRACES_SAMPLER" $v.otel.sampler
    "OTEL_TRACES_SAMPLER_ARG" $v.otel.samplerArg
}}
{{- $attrs := list (printf "service.namespace=%s" (include "shop.fullname" $root)) (printf "service.version=%s" $root.Chart.AppVersion) (printf "k8s.namespace.name=%s" $root.Release.Namespace) }}
{{- if $v.otel.resourceAttributes }}{{- $attrs = append $attrs $v.otel.resourceAttributes }}{{- end }}
{{- $_ := set $env "OTEL_RESOURCE_ATTRIBUTES" (join "," $attrs) }}
{{- if $v.otel.endpoint }}{{- $_ := set $env "OTEL_EXPORTER_OTLP_ENDPOINT" $v.otel.endpoint }}{{- end }}
{{- if has .component (splitList " " (include "shop.dbServices" $root)) }}
{{- $_ := set $env "DB_MAX_CONNECTIONS" (toString $v.database.maxConnections) }}
{{- $_ := set $env "DB_ACQUIRE_TIMEOUT" (printf "%ds" (int $v.database.acquireTimeoutSeconds)) }}
{{- end }}
{{- $_ := set $env "AUTH_MODE" $v.auth.mode }}
{{- if eq .component "user" }}
{{- $_ := set $env "JWT_PRIVATE_KEY_FILE" (printf "/var/run/secrets/shop/jwt/%s" $v.auth.existingSecretKey) }}
{{- $_ := set $env "ACCESS_TOKEN_TTL" $v.auth.accessTokenTTL }}
{{- $_ := set $env "LOGIN_MAX_FAILURES_PER_ACCOUNT" (toString $v.auth.loginThrottle.maxFailuresPerAccount) }}
{{- $_ := set $env "LOGIN_MAX_FAILURES_PER_ADDRESS" (toString $v.auth.loginThrottle.maxFailuresPerAddress) }}
{{- $_ := set $env "LOGIN_THROTTLE_WINDOW" $v.auth.loginThrottle.window }}
{{- with $v.auth.adminEmail }}{{- $_ := set $env "ADMIN_EMAIL" . }}{{- end }}
{{- if $v.auth.adminPasswordSecret }}{{- $_ := set $env "ADMIN_PASSWORD_FILE" "/var/run/secrets/shop/admin/password" }}{{- end }}
{{- else }}
{{- $_ := set $env "JWT_JWKS_URL" (printf "%s/.well-known/jwks.json" (include "shop.url" (dict "root" $root "component" "user"))) }}
{{- end }}
{{- if ne .component "gateway" }}
{{- $_ := set $env "AUTH_TRUST" $v.auth.trust }}
{{- end }}
{{- if eq .component "order" }}
{{- $_ := set $env "PRODUCT_URL" (include "shop.url" (dict "root" $root "component" "product")) }}
{{- $_ := set $env "USER_URL" (include "shop.url" (dict "root" $root "component" "user")) }}
{{- end }}
{{- if eq .component "gateway" }}
{{- if eq $v.discovery.mode "kubernetes" }}
{{- $_ := set $env "DISCOVERY" "kubernetes" }}
{{- $_ := set $env "DISCOVERY_NAMESPACE" $root.Release.Namespace }}
{{- $_ := set $env "DISCOVERY_PORT_NAME" "http" }}
{{- end }}
{{- range $upstream := list "product" "order" "user" }}
{{- if eq $v.discovery.mode "kubernetes" }}
{{- $_ := set $env (printf "%s_SERVICE" (upper $upstream)) (include "shop.componentName" (dict "root" $root "component" $upstream)) }}
{{- else }}
{{- $_ := set $env (printf "%s_URL" (upper $upstream)) (include "shop.url" (dict "root" $root "component" $upstream)) }}
{{- end }}
{{- with $v.auth.corsAllowedOrigins }}{{- $_ := set $env "CORS_ALLOWED_ORIGINS" . }}{{- end }}
{{- end }}
{{- end }}
{{- range $name, $value := $c.env }}{{- $_ := set $env $name (toString $value) }}{{- end }}
{{- range $name := keys $env | sortAlpha }}
{{ $name }}: {{ index $env $name | quote }}
{{- end }}
{{- end }}

{{/* The node's configuration: the ConfigMap's content, and the pod template's checksum of it. */}}
{{- define "shop.rabbitmqConfig" -}}
listeners.tcp.default = 5672
prometheus.tcp.port = 15692
log.file = false
log.console = true
log.console.level = {{ ternary "debug" "info" (hasPrefix "debug" .Values.logging.level) }}
{{- if eq .Values.logging.format "json" }}
log.console.formatter = json
{{- end }}
# Publishers are blocked (flow control) above this, well before the container's
# memory limit: the node cannot see that limit itself.
vm_memory_high_watermark.absolute = {{ .Values.rabbitmq.memoryHighWatermark }}
disk_free_limit.absolute = {{ .Values.rabbitmq.diskFreeLimit }}
{{- end }}
