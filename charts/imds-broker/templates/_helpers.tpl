{{/*
Names. With the release name "imds-broker" every object has the name deploy/ gives it.
*/}}
{{- define "imds-broker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "imds-broker.webhookName" -}}
{{- printf "%s-webhook" (include "imds-broker.fullname" .) -}}
{{- end -}}

{{- define "imds-broker.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "imds-broker.fullname" .) -}}
{{- end -}}

{{/* Selector labels: what the Deployment, Service, PDB and NetworkPolicy select on. */}}
{{- define "imds-broker.selectorLabels" -}}
app.kubernetes.io/name: imds-broker
app.kubernetes.io/component: webhook
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "imds-broker.labels" -}}
{{ include "imds-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The webhook's image. There is no public image: rendering without image.repository fails
with a message instead of installing a webhook whose pods cannot be pulled.
*/}}
{{- define "imds-broker.image" -}}
{{- $repo := required "image.repository is required: build the image (Dockerfile or scripts/build-image), push it to your registry, and pass --set image.repository=<registry>/imds-broker" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "imds-broker.sidecarImage" -}}
{{- default (include "imds-broker.image" .) .Values.sidecar.image -}}
{{- end -}}

{{/* The serving certificate's DNS names (the Service's in-cluster names). */}}
{{- define "imds-broker.dnsNames" -}}
{{- $svc := include "imds-broker.webhookName" . -}}
- {{ printf "%s.%s.svc" $svc .Release.Namespace }}
- {{ printf "%s.%s.svc.cluster.local" $svc .Release.Namespace }}
{{- end -}}

{{/*
Self-signed mode: a CA and a serving certificate, generated once and kept across upgrades
(read back from the Secret with lookup). Returns a dict with ca, crt, key (PEM).
*/}}
{{- define "imds-broker.selfSignedTLS" -}}
{{- $secretName := include "imds-broker.tlsSecret" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $secretName -}}
{{- if and $existing (index $existing.data "ca.crt") -}}
ca: {{ index $existing.data "ca.crt" | b64dec | quote }}
crt: {{ index $existing.data "tls.crt" | b64dec | quote }}
key: {{ index $existing.data "tls.key" | b64dec | quote }}
{{- else -}}
{{- $svc := include "imds-broker.webhookName" . -}}
{{- $days := int .Values.certificates.selfSigned.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "imds-broker.fullname" .)) $days -}}
{{- $cn := printf "%s.%s.svc" $svc .Release.Namespace -}}
{{- $cert := genSignedCert $cn nil (list $cn (printf "%s.cluster.local" $cn)) $days $ca -}}
ca: {{ $ca.Cert | quote }}
crt: {{ $cert.Cert | quote }}
key: {{ $cert.Key | quote }}
{{- end -}}
{{- end -}}

{{/* The label keys of webhook.matchLabels, comma-separated (IMDS_BROKER_WEBHOOK_MATCH_LABELS). */}}
{{- define "imds-broker.matchLabelKeys" -}}
{{- $keys := list -}}
{{- range .Values.webhook.matchLabels -}}
{{- $keys = append $keys (required "webhook.matchLabels[].key is required" .key) -}}
{{- end -}}
{{- if not $keys -}}
{{- fail "webhook.matchLabels is empty: the webhook would match no pod" -}}
{{- end -}}
{{- join "," $keys -}}
{{- end -}}
