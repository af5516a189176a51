{{/*
Names and labels. Every resource is "<fullname>-<component>", except the ConfigMap, the Secret,
the ServiceAccount and the NetworkPolicy, which all components share.
*/}}

{{- define "beseda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "beseda.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "beseda.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every resource. */}}
{{- define "beseda.labels" -}}
helm.sh/chart: {{ include "beseda.chart" . }}
app.kubernetes.io/name: {{ include "beseda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: beseda
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "gateway"). */}}
{{- define "beseda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beseda.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's resources and pods; same argument as beseda.selectorLabels. */}}
{{- define "beseda.componentLabels" -}}
{{ include "beseda.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "beseda.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "beseda.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "beseda.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "beseda.secretName" -}}
{{- default (include "beseda.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* "<namespace>.svc.<cluster domain>", the suffix of every in-cluster name the chart builds. */}}
{{- define "beseda.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* Headless Services: DNS answers with every ready pod's address, which the gRPC clients balance over. */}}
{{- define "beseda.routingGrpcService" -}}
{{- printf "%s-routing-grpc" (include "beseda.fullname" .) }}
{{- end }}

{{- define "beseda.botsGrpcService" -}}
{{- printf "%s-bots-grpc" (include "beseda.fullname" .) }}
{{- end }}

{{- define "beseda.registryName" -}}
{{- printf "%s-registry" (include "beseda.fullname" .) }}
{{- end }}

{{/* gRPC URL of registry voter number $i (pod ordinal); call with (list $ $i). */}}
{{- define "beseda.registryVoterUrl" -}}
{{- $root := index . 0 }}
{{- $name := include "beseda.registryName" $root }}
{{- printf "http://%s-%d.%s.%s:9087" $name (index . 1) $name (include "beseda.svcDomain" $root) }}
{{- end }}

{{/* BESEDA_REGISTRY_PEERS: "1=<url of pod 0>,2=<url of pod 1>,..."; ids are ordinal + 1. */}}
{{- define "beseda.registryPeers" -}}
{{- $peers := list }}
{{- range $i := until (int .Values.registry.replicas) }}
{{- $peers = append $peers (printf "%d=%s" (add1 $i) (include "beseda.registryVoterUrl" (list $ $i))) }}
{{- end }}
{{- join "," $peers }}
{{- end }}

{{/* BESEDA_REGISTRY_ENDPOINTS: every voter's gRPC URL. */}}
{{- define "beseda.registryEndpoints" -}}
{{- $urls := list }}
{{- range $i := until (int .Values.registry.replicas) }}
{{- $urls = append $urls (include "beseda.registryVoterUrl" (list $ $i)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{- define "beseda.publicUrl" -}}
{{- if .Values.publicUrl }}
{{- .Values.publicUrl }}
{{- else if and .Values.ingress.enabled .Values.ingress.host }}
{{- printf "%s://%s" (ternary "https" "http" .Values.ingress.tls.enabled) .Values.ingress.host }}
{{- end }}
{{- end }}

{{/* The pod spec every component shares; call with (dict "root" $ "component" "gateway" "roles" "gateway" "values" .Values.gateway). */}}
{{- define "beseda.podSpec" -}}
{{- $root := .root }}
{{- $values := .values }}
{{- $grace := int $root.Values.config.shutdownGraceSeconds }}
{{- $preStop := int $root.Values.config.preStopSleepSeconds -}}
serviceAccountName: {{ include "beseda.serviceAccountName" $root }}
automountServiceAccountToken: false
# No service-link variables: the processes find each other through the
# BESEDA_* settings below, and with a release named "beseda" the links
# (BESEDA_GATEWAY_SERVICE_HOST, BESEDA_REGISTRY_PORT=tcp://...) would share
# the server's prefix. The server skips their shapes anyway
# (docs/configuration.md, "Reserved names").
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
# The preStop pause, then the server's own drain, then a margin before SIGKILL.
terminationGracePeriodSeconds: {{ add $preStop $grace 10 }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: beseda
    image: {{ include "beseda.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args: ["serve"]
    ports:
      - name: http
        containerPort: 8087
        protocol: TCP
      {{- if ne .component "gateway" }}
      # Internal gRPC: routing, bots and registry serve it; gateways only call out.
      - name: grpc
        containerPort: 9087
        protocol: TCP
      {{- end }}
    envFrom:
      - configMapRef:
          name: {{ include "beseda.fullname" $root }}
    env:
      - name: BESEDA_ROLES
        value: {{ .roles | quote }}
      - name: BESEDA_NODE_ID
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      {{- /* Each role gets the connections it uses and no others: only routing and bots touch
             PostgreSQL, Redis carries events between routing, gateways and the registry (which
             announces expired gateways' users offline), and routing sends the mail. */}}
      {{- $needs := get (dict "gateway" (list "redis") "routing" (list "postgres" "redis" "smtp") "bots" (list "postgres" "redis") "registry" (list "redis")) .component }}
      {{- $external := ne $root.Values.existingSecret "" }}
      {{- if has "postgres" $needs }}
      - name: BESEDA_STORE_BACKEND
        value: postgres
      - name: BESEDA_STORE_POOL_SIZE
        value: {{ $values.storePoolSize | quote }}
      {{- with $root.Values.postgres.schema }}
      - name: BESEDA_POSTGRES_SCHEMA
        value: {{ . | quote }}
      {{- end }}
      - name: BESEDA_POSTGRES_URL
        valueFrom:
          secretKeyRef:
            name: {{ include "beseda.secretName" $root }}
            key: {{ ternary $root.Values.existingSecretKeys.postgresUrl "postgres-url" $external }}
      {{- end }}
      {{- if has "redis" $needs }}
      - name: BESEDA_REDIS_URL
        valueFrom:
          secretKeyRef:
            name: {{ include "beseda.secretName" $root }}
            key: {{ ternary $root.Values.existingSecretKeys.redisUrl "redis-url" $external }}
      {{- end }}
      {{- if and (has "smtp" $needs) (or $external $root.Values.smtp.url) }}
      - name: BESEDA_SMTP_URL
        valueFrom:
          secretKeyRef:
            name: {{ include "beseda.secretName" $root }}
            key: {{ ternary $root.Values.existingSecretKeys.smtpUrl "smtp-url" $external }}
            optional: {{ $external }}
      {{- end }}
      {{- if or $external $root.Values.clusterToken.enabled }}
      - name: BESEDA_CLUSTER_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ include "beseda.secretName" $root }}
            key: {{ ternary $root.Values.existingSecretKeys.clusterToken "cluster-token" $external }}
            optional: {{ $external }}
      {{- end }}
      {{- with .extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with $values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if gt $preStop 0 }}
    lifecycle:
      preStop:
        exec:
          command: ["sleep", {{ $preStop | quote }}]
    {{- end }}
    startupProbe:
      httpGet:
        path: /rs/health
        port: http
      periodSeconds: 2
      timeoutSeconds: 2
      failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
    readinessProbe:
      httpGet:
        path: /rs/health
        port: http
      periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
      timeoutSeconds: 2
      failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
    livenessProbe:
      httpGet:
        path: /rs/live
        port: http
      periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
      timeoutSeconds: 3
      failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
    resources:
      {{- toYaml $values.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: data
        mountPath: /var/lib/beseda
      - name: tmp
        mountPath: /tmp
volumes:
  {{- if not .persistent }}
  # Stateless roles: the data directory holds only the mail outbox (without SMTP); it dies with the pod.
  - name: data
    emptyDir: {}
  {{- end }}
  - name: tmp
    emptyDir: {}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .affinity }}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod annotations: config checksums (a changed ConfigMap or chart Secret rolls the pods), scrape hints, the user's. */}}
{{- define "beseda.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- /* Over the Secret's inputs, not its rendering: a generated cluster token must not roll the pods. */}}
checksum/secret: {{ list .root.Values.postgres .root.Values.redis .root.Values.smtp .root.Values.clusterToken .root.Values.existingSecret .root.Values.existingSecretKeys | toJson | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: "8087"
prometheus.io/path: /metrics
{{- end }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Default affinity of the stateless components: prefer one pod per node. */}}
{{- define "beseda.softAntiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "beseda.selectorLabels" . | nindent 12 }}
{{- end }}
