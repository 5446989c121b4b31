{{/* Names: <release>-bastion, shortened to 63 characters (DNS labels). */}}
{{- define "bastion.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "bastion.proxyName" -}}{{ include "bastion.fullname" . }}-proxy{{- end -}}
{{- define "bastion.appName" -}}{{ include "bastion.fullname" . }}-app{{- end -}}

{{- define "bastion.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bastion.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bastion.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* host:port clients use; also in each proxy's certificate. */}}
{{- define "bastion.publicAddr" -}}
{{- .Values.proxy.publicAddr | default (printf "%s:%v" (include "bastion.proxyName" .) .Values.proxy.service.port) -}}
{{- end -}}

{{/* The PostgreSQL DSN without a password (PGPASSWORD comes from the Secret). */}}
{{- define "bastion.dsn" -}}
{{- $p := .Values.postgresql -}}
{{- $host := ternary (printf "[%s]" $p.host) $p.host (contains ":" $p.host) -}}
postgresql://{{ $p.user }}@{{ $host }}:{{ $p.port }}/{{ $p.database }}?sslmode={{ $p.sslmode }}
{{- end -}}
