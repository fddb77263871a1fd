{{/* Chart name, overridable. */}}
{{- define "gpu-scaler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name when it already contains the chart name. Kept to 50
characters so the "-metrics"/"-peers"/"-scaler-tls" suffixes fit in 63.
*/}}
{{- define "gpu-scaler.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gpu-scaler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-scaler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-scaler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-scaler.labels" -}}
helm.sh/chart: {{ include "gpu-scaler.chart" . }}
{{ include "gpu-scaler.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-daemon
app.kubernetes.io/part-of: gpu-scaler
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpu-scaler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-scaler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpu-scaler.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Headless Service whose EndpointSlices list the daemons (--peer-service). */}}
{{- define "gpu-scaler.peerService" -}}
{{- printf "%s-peers" (include "gpu-scaler.fullname" .) }}
{{- end }}

{{- define "gpu-scaler.scalerTlsSecret" -}}
{{- default (printf "%s-scaler-tls" (include "gpu-scaler.fullname" .)) .Values.tls.scaler.secretName }}
{{- end }}

{{- define "gpu-scaler.peerTlsSecret" -}}
{{- default (printf "%s-peer-tls" (include "gpu-scaler.fullname" .)) .Values.tls.peer.secretName }}
{{- end }}

{{/* Peer mTLS is on: TLS enabled and the peer part not switched off. */}}
{{- define "gpu-scaler.peerTls" -}}
{{- if and .Values.tls.enabled .Values.tls.peer.enabled }}true{{ end }}
{{- end }}

{{/* Fails rendering on option combinations that cannot work. */}}
{{- define "gpu-scaler.validate" -}}
{{- if not (has .Values.tls.source (list "secret" "certManager")) }}
{{- fail (printf "tls.source must be `secret` or `certManager`, not %q" .Values.tls.source) }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.tls.source "certManager") (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.source=certManager needs tls.certManager.issuerRef.name" }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.tls.source "certManager") .Values.tls.certManager.kedaClient.enabled (ne .Values.tls.certManager.issuerRef.kind "ClusterIssuer") }}
{{- fail "tls.certManager.kedaClient issues a certificate in KEDA's namespace and needs issuerRef.kind=ClusterIssuer (or set kedaClient.enabled=false)" }}
{{- end }}
{{- if not (has .Values.daemon.missingNodePolicy (list "average" "fail")) }}
{{- fail (printf "daemon.missingNodePolicy must be `average` or `fail`, not %q" .Values.daemon.missingNodePolicy) }}
{{- end }}
{{- if not (has .Values.daemon.attribution (list "auto" "ebpf" "procfs")) }}
{{- fail (printf "daemon.attribution must be auto, ebpf or procfs, not %q" .Values.daemon.attribution) }}
{{- end }}
{{- if and (eq .Values.daemon.gpu "mock") (not .Values.daemon.mockScenario) }}
{{- fail "daemon.gpu=mock needs daemon.mockScenario (the scenario file's content)" }}
{{- end }}
{{- if not (has .Values.daemon.gpu (list "nvml" "mock")) }}
{{- fail (printf "daemon.gpu must be nvml or mock, not %q" .Values.daemon.gpu) }}
{{- end }}
{{- end }}
