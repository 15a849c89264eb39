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

{{/* Node mode's objects: DaemonSet, ServiceAccount, Secret, Service, Roles (`<fullname>-node`). */}}
{{- define "imds-broker.nodeName" -}}
{{- printf "%s-node" (include "imds-broker.fullname" .) -}}
{{- end -}}

{{/*
The install mode: "sidecar" (the webhook injects the broker into labelled pods) or "node" (one
broker per node, a DaemonSet). Fails on anything else, so a typo never renders an empty release.
*/}}
{{- define "imds-broker.mode" -}}
{{- if not (has .Values.mode (list "sidecar" "node")) -}}
{{- fail (printf "mode must be sidecar or node, not %q" .Values.mode) -}}
{{- end -}}
{{- .Values.mode -}}
{{- end -}}

{{- define "imds-broker.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "imds-broker.fullname" .) -}}
{{- end -}}

{{/* Selector labels: what the Deployment, Service, PDB and NetworkPolicy select on. */}}
{{- define "imds-broker.selectorLabels" -}}
{{ include "imds-broker.componentSelectorLabels" (list . "webhook") }}
{{- end -}}

{{- define "imds-broker.labels" -}}
{{ include "imds-broker.componentLabels" (list . "webhook") }}
{{- end -}}

{{/* Node mode's: the DaemonSet, its Service and PodMonitor select on these. */}}
{{- define "imds-broker.nodeSelectorLabels" -}}
{{ include "imds-broker.componentSelectorLabels" (list . "node") }}
{{- end -}}

{{- define "imds-broker.nodeLabels" -}}
{{ include "imds-broker.componentLabels" (list . "node") }}
{{- end -}}

{{/* The labels of one component; called with (list $root "component"). */}}
{{- define "imds-broker.componentSelectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: imds-broker
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- end -}}

{{- define "imds-broker.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "imds-broker.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
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

{{/*
Node mode: the identity header every Velero pod sends as X-IDENTITY-HEADER, kept in the Secret
`<fullname>-node` (key identity-header). node.identityHeader.value when set; else the value the
Secret already holds (read back with lookup, so upgrades keep it); else 48 random letters and
digits (crypto/rand). lookup needs the cluster: `helm template` and Argo CD render without one
and would generate a new value each time, so set the value (or createSecret: false) there.
*/}}
{{- define "imds-broker.identityHeader" -}}
{{- $value := .Values.node.identityHeader.value | default "" | toString -}}
{{- if $value -}}
{{- if not (regexMatch "^[A-Za-z0-9._~+/=-]{16,512}$" $value) -}}
{{- fail "node.identityHeader.value must be 16-512 letters, digits or -._~+/= (e.g. openssl rand -hex 32)" -}}
{{- end -}}
{{- $value -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "imds-broker.nodeName" .) -}}
{{- if and $existing $existing.data (index $existing.data "identity-header") -}}
{{- index $existing.data "identity-header" | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Node mode: the namespaces whose pods may get tokens (a Role in each); default: this one. */}}
{{- define "imds-broker.allowNamespaces" -}}
{{- $list := .Values.node.allowNamespaces | default (list .Release.Namespace) -}}
{{- join "," $list -}}
{{- end -}}
