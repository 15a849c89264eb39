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

{{/* The serving certificate's Secret: certificates.manual.secretName in manual mode, if set. */}}
{{- define "imds-broker.tlsSecret" -}}
{{- if and (eq .Values.certificates.mode "manual") .Values.certificates.manual.secretName -}}
{{- .Values.certificates.manual.secretName -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "imds-broker.fullname" .) -}}
{{- end -}}
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
{{- if and .Values.image.digest .Values.image.tag -}}
{{- fail (printf "image.tag (%s) and image.digest (%s) are both set, and a digest would silently win over the tag: set one, and clear the other (--set image.digest= to deploy the tag, or --set image.tag= to deploy the digest). With --reuse-values the previous release's digest is kept: docs/upgrading.md" .Values.image.tag .Values.image.digest) -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (toString (default .Chart.AppVersion .Values.image.tag)) -}}
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

{{/* The first PEM certificate of a bundle ("" if none). */}}
{{- define "imds-broker.firstPEM" -}}
{{- regexFind "(?s)-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----" . -}}
{{- end -}}

{{/*
Self-signed mode, what this render does with the certificate (deterministic: NOTES.txt calls
it too). Returns a dict:
  action:  keep | generate (no certificate in the cluster) | rotate (a new CA and certificate
           replace the one in the Secret, whose CA stays trusted);
  reason:  why, for NOTES.txt and the Secret's comment;
  oldCA:   on rotate, the CA the replicas serve under until kubelet refreshes their Secret
           volume: the first certificate of the Secret's ca.crt, or (Secret gone) of the
           caBundle the cluster has now; empty on a first install;
  notAfter: on keep, the expiry recorded in the Secret (RFC 3339).
The Secret's ca.crt is the caBundle: the current CA first, then the previous one.
lookup answers from the cluster during helm install/upgrade only; `helm template` and Argo CD
get nothing, so for them every render is "generate" (values.yaml, certificates).
*/}}
{{- define "imds-broker.selfSignedPlan" -}}
{{- $ss := .Values.certificates.selfSigned -}}
{{- $days := int $ss.validityDays -}}
{{- $renewBefore := int $ss.renewBeforeDays -}}
{{- if ge $renewBefore $days -}}
{{- fail (printf "certificates.selfSigned.renewBeforeDays (%d) must be less than validityDays (%d), or every upgrade would rotate the certificate" $renewBefore $days) -}}
{{- end -}}
{{- $force := toString ($ss.forceRotation | default "") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "imds-broker.tlsSecret" .) | default dict -}}
{{- $data := $existing.data | default dict -}}
{{- $annotations := (($existing.metadata | default dict).annotations) | default dict -}}
{{- $plan := dict "action" "keep" "reason" "" "oldCA" "" "notAfter" "" -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") -}}
{{- $notAfter := index $annotations "imds-broker.io/not-after" | default "" -}}
{{- $_ := set $plan "notAfter" $notAfter -}}
{{- $_ := set $plan "oldCA" (include "imds-broker.firstPEM" (index $data "ca.crt" | b64dec)) -}}
{{- if not $notAfter -}}
{{- $_ := set $plan "action" "rotate" -}}
{{- $_ := set $plan "reason" "the Secret has no imds-broker.io/not-after annotation (made by a chart before 0.2), so its expiry is unknown" -}}
{{- else if ne (index $annotations "imds-broker.io/force-rotation" | default "") $force -}}
{{- $_ := set $plan "action" "rotate" -}}
{{- $_ := set $plan "reason" (printf "certificates.selfSigned.forceRotation changed to %q" $force) -}}
{{- else if lt (sub (toDate "2006-01-02T15:04:05Z07:00" $notAfter).Unix (now).Unix) (mul $renewBefore 86400) -}}
{{- $_ := set $plan "action" "rotate" -}}
{{- $_ := set $plan "reason" (printf "the certificate expires on %s, within renewBeforeDays (%d)" $notAfter $renewBefore) -}}
{{- else -}}
{{- $_ := set $plan "reason" (printf "the certificate in Secret %s is kept" (include "imds-broker.tlsSecret" .)) -}}
{{- end -}}
{{- else -}}
{{- $mwc := lookup "admissionregistration.k8s.io/v1" "MutatingWebhookConfiguration" "" (include "imds-broker.fullname" .) | default dict -}}
{{- $bundle := "" -}}
{{- range ($mwc.webhooks | default list) -}}
{{- if and (not $bundle) .clientConfig .clientConfig.caBundle -}}
{{- $bundle = .clientConfig.caBundle | b64dec -}}
{{- end -}}
{{- end -}}
{{- $_ := set $plan "oldCA" (include "imds-broker.firstPEM" $bundle) -}}
{{- if $plan.oldCA -}}
{{- $_ := set $plan "action" "rotate" -}}
{{- $_ := set $plan "reason" (printf "Secret %s is gone; the caBundle keeps the CA the replicas still serve under" (include "imds-broker.tlsSecret" .)) -}}
{{- else -}}
{{- $_ := set $plan "action" "generate" -}}
{{- $_ := set $plan "reason" (printf "no Secret %s found through Helm's lookup (a first install, or a render without cluster access)" (include "imds-broker.tlsSecret" .)) -}}
{{- end -}}
{{- end -}}
{{- toYaml $plan -}}
{{- end -}}

{{/*
Self-signed mode: the Secret's content. Returns a dict with ca (the caBundle: PEM, current CA
first), crt, key (PEM), notAfter (RFC 3339), action and reason (of selfSignedPlan). The CA's
private key is never stored: nothing can sign with a CA that stays in the bundle.
*/}}
{{- define "imds-broker.selfSignedTLS" -}}
{{- $plan := include "imds-broker.selfSignedPlan" . | fromYaml -}}
{{- if eq $plan.action "keep" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "imds-broker.tlsSecret" .) -}}
ca: {{ index $existing.data "ca.crt" | b64dec | quote }}
crt: {{ index $existing.data "tls.crt" | b64dec | quote }}
key: {{ index $existing.data "tls.key" | b64dec | quote }}
notAfter: {{ $plan.notAfter | quote }}
{{- else -}}
{{- $svc := include "imds-broker.webhookName" . -}}
{{- $days := int .Values.certificates.selfSigned.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "imds-broker.fullname" .)) $days -}}
{{- $cn := printf "%s.%s.svc" $svc .Release.Namespace -}}
{{- $cert := genSignedCert $cn nil (list $cn (printf "%s.cluster.local" $cn)) $days $ca -}}
{{- $bundle := $ca.Cert -}}
{{- if $plan.oldCA -}}
{{- $bundle = printf "%s%s\n" $ca.Cert $plan.oldCA -}}
{{- end -}}
ca: {{ $bundle | quote }}
crt: {{ $cert.Cert | quote }}
key: {{ $cert.Key | quote }}
{{- /* genCA/genSignedCert set NotAfter to now + days. */}}
notAfter: {{ dateInZone "2006-01-02T15:04:05Z07:00" (dateModify (printf "+%dh" (mul $days 24)) now) "UTC" | quote }}
{{- end }}
action: {{ $plan.action | quote }}
reason: {{ $plan.reason | quote }}
{{- end -}}

{{/*
Manual mode: the caBundle (base64) from certificates.manual.caBundle, given as PEM or as its
base64. Fails when it is not there or holds no certificate.
*/}}
{{- define "imds-broker.manualCABundle" -}}
{{- $given := required "certificates.mode=manual needs certificates.manual.caBundle: the PEM of the CA that signed your Secret's tls.crt (--set-file certificates.manual.caBundle=ca.crt)" .Values.certificates.manual.caBundle | toString | trim -}}
{{- $pem := $given -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $given) -}}
{{- $pem = b64dec $given -}}
{{- end -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $pem) -}}
{{- fail "certificates.manual.caBundle holds no PEM certificate (-----BEGIN CERTIFICATE-----), nor base64 of one: pass the CA file with --set-file certificates.manual.caBundle=ca.crt" -}}
{{- end -}}
{{- printf "%s\n" (trim $pem) | b64enc -}}
{{- end -}}

{{/*
Sidecar image pull secrets, comma-separated (IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS):
sidecar.imagePullSecrets holds names or {name: ...} entries.
*/}}
{{- define "imds-broker.sidecarPullSecrets" -}}
{{- $names := list -}}
{{- range .Values.sidecar.imagePullSecrets -}}
{{- if kindIs "map" . -}}
{{- $names = append $names (required "sidecar.imagePullSecrets: an entry without name" .name) -}}
{{- else -}}
{{- $names = append $names (toString .) -}}
{{- end -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/*
The PodDisruptionBudget's one field: minAvailable when set (it must leave a replica to evict),
else maxUnavailable. Returns "minAvailable: N" or "maxUnavailable: N".
*/}}
{{- define "imds-broker.pdbSpec" -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- $replicas := int .Values.replicaCount -}}
{{- if not (kindIs "invalid" $pdb.minAvailable) -}}
{{- $min := $pdb.minAvailable -}}
{{- $needed := 0 -}}
{{- if kindIs "string" $min -}}
{{- $needed = ceil (divf (mulf (trimSuffix "%" $min | float64) $replicas) 100) | int -}}
{{- else -}}
{{- $needed = int $min -}}
{{- end -}}
{{- if ge $needed $replicas -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) must be less than replicaCount (%d): otherwise no webhook replica may ever be evicted, and node drains and AKS upgrades block. Raise replicaCount, lower minAvailable, or unset it (--set podDisruptionBudget.minAvailable=null) to use maxUnavailable" $min $replicas) -}}
{{- end -}}
minAvailable: {{ $min }}
{{- else -}}
maxUnavailable: {{ required "podDisruptionBudget needs maxUnavailable or minAvailable" $pdb.maxUnavailable }}
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
