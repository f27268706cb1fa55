{{/* Chart name, truncated to 63 characters (the label value limit). */}}
{{- define "datahoard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release-chart, truncated to 63 characters; the release name alone when it already
contains the chart name.
*/}}
{{- define "datahoard.fullname" -}}
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

{{- define "datahoard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "datahoard.labels" -}}
helm.sh/chart: {{ include "datahoard.chart" . }}
{{ include "datahoard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; components add app.kubernetes.io/component. */}}
{{- define "datahoard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datahoard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The one image of every component: repository@digest, or repository:tag (default appVersion). */}}
{{- define "datahoard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "datahoard.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "datahoard.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Empty means the namespace's default ServiceAccount (the operator's own default). */}}
{{- define "datahoard.worker.serviceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (printf "%s-worker" (include "datahoard.fullname" .)) .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "datahoard.csiNode.serviceAccountName" -}}
{{- printf "%s-csi-node" (include "datahoard.fullname" .) }}
{{- end }}

{{/* The CSI driver name: fixed, because PVs the operator writes name it (datahoard/names.py). */}}
{{- define "datahoard.csiDriverName" -}}
csi.datahoard.io
{{- end }}

{{/* kubelet's root without a trailing slash. */}}
{{- define "datahoard.kubeletDir" -}}
{{- trimSuffix "/" .Values.csiNode.kubeletDir }}
{{- end }}
