{{/*
The registry that replaces the registry part of every image, or "": global.imageRegistry
(set once for all charts of an umbrella release) wins over image.registry.
*/}}
{{- define "blockvol.registry" -}}
{{- (.Values.global).imageRegistry | default .Values.image.registry | default "" | trimSuffix "/" -}}
{{- end -}}

{{/*
An image reference with the registry override applied. Call with
(dict "image" REF "registry" REGISTRY). The first path part of REF is its registry when
it holds a "." or ":" or is "localhost" (as the container runtime reads it); that part is
replaced, any other REF (blockvol/blockvol) gets the registry put in front.
*/}}
{{- define "blockvol.withRegistry" -}}
{{- $image := .image -}}
{{- if .registry -}}
{{- $parts := splitList "/" $image -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $image = rest $parts | join "/" -}}
{{- end -}}
{{- printf "%s/%s" .registry $image -}}
{{- else -}}
{{- $image -}}
{{- end -}}
{{- end -}}

{{/* The blockvol image (operator, agent, CSI driver). */}}
{{- define "blockvol.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- include "blockvol.withRegistry" (dict "image" $ref "registry" (include "blockvol.registry" .)) -}}
{{- end -}}

{{/* A sidecar's image: (include "blockvol.sidecarImage" (list $ "provisioner")). */}}
{{- define "blockvol.sidecarImage" -}}
{{- $root := index . 0 -}}
{{- $ref := (index $root.Values.sidecars (index . 1)).image -}}
{{- include "blockvol.withRegistry" (dict "image" $ref "registry" (include "blockvol.registry" $root)) -}}
{{- end -}}

{{/*
The pod's imagePullSecrets (global.imagePullSecrets then imagePullSecrets; each a name or
{name: NAME}), or nothing.
*/}}
{{- define "blockvol.imagePullSecrets" -}}
{{- $secrets := concat ((.Values.global).imagePullSecrets | default list) (.Values.imagePullSecrets | default list) -}}
{{- if $secrets }}
imagePullSecrets:
{{- range $secrets }}
  - name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The log settings of every blockvol container (logging.level, logging.format). */}}
{{- define "blockvol.logEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
- name: BLOCKVOL_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end -}}

{{- define "blockvol.labels" -}}
app.kubernetes.io/name: blockvol
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "blockvol.selector" -}}
app.kubernetes.io/name: blockvol
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Refuses sidecar timeouts shorter than the CSI controller's own waits: a provisioner that
gives up on CreateVolume before the driver does retries a call that is about to succeed.
*/}}
{{- define "blockvol.checkTimeouts" -}}
{{- $create := div (int64 .Values.csiController.createReadyTimeoutMs) 1000 -}}
{{- if le (int64 .Values.sidecars.provisioner.timeoutSeconds) $create -}}
{{- fail (printf "sidecars.provisioner.timeoutSeconds (%v) must exceed csiController.createReadyTimeoutMs (%v ms): CreateVolume waits that long for the volume to become Ready" .Values.sidecars.provisioner.timeoutSeconds .Values.csiController.createReadyTimeoutMs) -}}
{{- end -}}
{{- end -}}
