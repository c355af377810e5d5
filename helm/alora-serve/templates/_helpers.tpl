{{/* Names and labels. */}}
{{- define "alora.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector of the alora-serve pods (the bundled Redis has component=redis instead). */}}
{{- define "alora.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "alora.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "alora.commonLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "alora.labels" -}}
{{ include "alora.selectorLabels" . }}
{{ include "alora.commonLabels" . }}
{{- end -}}

{{- define "alora.redisLabels" -}}
{{ include "alora.redisSelectorLabels" . }}
{{ include "alora.commonLabels" . }}
{{- end -}}

{{/* The image: <appVersion>-cuda with a GPU, else <appVersion>-cpu, unless image.tag is set. */}}
{{- define "alora.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag) -}}
{{- end -}}

{{/* A path of the model source: absolute in the image, or under the PVC's mount. */}}
{{- define "alora.modelPath" -}}
{{- $root := index . 0 -}}{{- $path := index . 1 -}}
{{- if eq $root.Values.model.source "pvc" -}}
{{- printf "%s/%s" (trimSuffix "/" $root.Values.model.pvc.mountPath) (trimPrefix "/" $path) -}}
{{- else -}}
{{- $path -}}
{{- end -}}
{{- end -}}

{{/* ALORA_REDIS_URL: the bundled Redis, or the external URL (one Redis, Sentinel or Cluster) with
$(REDIS_PASSWORD) spliced in. */}}
{{- define "alora.redisUrl" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- printf "redis://%s-redis:6379/0" (include "alora.fullname" .) -}}
{{- else if .Values.redis.external.passwordSecret.name -}}
{{- regexReplaceAll "^(rediss?(\\+cluster|\\+sentinel)?://)" .Values.redis.external.url "${1}:$(REDIS_PASSWORD)@" -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* A CPU quantity ("2", 2, "1500m") rounded up to whole CPUs: the forward threads of a CPU replica. */}}
{{- define "alora.wholeCpus" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- div (add (trimSuffix "m" $q | int) 999) 1000 | max 1 -}}
{{- else -}}
{{- ceil (float64 $q) | int | max 1 -}}
{{- end -}}
{{- end -}}
