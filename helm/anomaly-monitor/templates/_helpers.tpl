{{/*
Chart name, cut to 63 characters because Kubernetes label values and DNS labels
allow no more.
*/}}
{{- define "anomaly-monitor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. A release named like the chart is not
repeated (`anomaly-monitor`, not `anomaly-monitor-anomaly-monitor`).
*/}}
{{- define "anomaly-monitor.fullname" -}}
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

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "anomaly-monitor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "anomaly-monitor.labels" -}}
helm.sh/chart: {{ include "anomaly-monitor.chart" . }}
{{ include "anomaly-monitor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: anomaly-monitor
{{- end }}

{{/*
Labels that select the pods. They never change between versions, because the
selector of a Deployment or StatefulSet is immutable.
*/}}
{{- define "anomaly-monitor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "anomaly-monitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "anomaly-monitor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "anomaly-monitor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: registry/repository, then @digest when one is set, else :tag.
*/}}
{{- define "anomaly-monitor.image" -}}
{{- $repository := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repository = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Number of replicas: one without sharding, else one per shard.
*/}}
{{- define "anomaly-monitor.replicas" -}}
{{- if .Values.sharding.enabled }}{{ .Values.sharding.replicas }}{{ else }}1{{ end }}
{{- end }}

{{/*
Folders where the pod sees its config and the credentials of existing Secrets.
*/}}
{{- define "anomaly-monitor.configDir" -}}/etc/anomaly-monitor{{- end }}
{{- define "anomaly-monitor.bearerTokenPath" -}}/etc/anomaly-monitor/secrets/bearer-token/{{ .Values.auth.bearerToken.key }}{{- end }}
{{- define "anomaly-monitor.basicAuthPasswordPath" -}}/etc/anomaly-monitor/secrets/basic-auth/{{ .Values.auth.basicAuth.passwordKey }}{{- end }}
{{- define "anomaly-monitor.caPath" -}}/etc/anomaly-monitor/secrets/ca/{{ .Values.auth.ca.key }}{{- end }}

{{/*
Fail on combinations of values that the schema cannot express.
*/}}
{{- define "anomaly-monitor.validate" -}}
{{- $auth := .Values.auth }}
{{- if and $auth.bearerToken.existingSecret $auth.basicAuth.existingSecret }}
{{- fail "auth: set either auth.bearerToken.existingSecret or auth.basicAuth.existingSecret, not both" }}
{{- end }}
{{- if and $auth.basicAuth.existingSecret (not $auth.basicAuth.username) }}
{{- fail "auth.basicAuth.username is required when auth.basicAuth.existingSecret is set" }}
{{- end }}
{{- if and $auth.basicAuth.username (not $auth.basicAuth.existingSecret) }}
{{- fail "auth.basicAuth.existingSecret is required when auth.basicAuth.username is set; the password is only read from a Secret" }}
{{- end }}
{{- if and $auth.ca.existingSecret $auth.ca.existingConfigMap }}
{{- fail "auth.ca: set either existingSecret or existingConfigMap, not both" }}
{{- end }}
{{- if and .Values.sharding.enabled .Values.persistence.existingClaim }}
{{- fail "persistence.existingClaim cannot be used with sharding: every shard needs its own volume, so the StatefulSet creates one claim per replica" }}
{{- end }}
{{- end }}
