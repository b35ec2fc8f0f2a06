{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "onesignal-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "onesignal-bridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "onesignal-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "onesignal-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onesignal-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "onesignal-bridge.labels" -}}
helm.sh/chart: {{ include "onesignal-bridge.chart" . }}
{{ include "onesignal-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: bridge
{{- end -}}

{{- define "onesignal-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "onesignal-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "onesignal-bridge.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "onesignal-bridge.secretName" -}}
{{- default (include "onesignal-bridge.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "onesignal-bridge.sourceKind" -}}
{{- .Values.config.source.kind | default "postgres" -}}
{{- end -}}

{{/* Where the configuration file lives in the container. */}}
{{- define "onesignal-bridge.configDir" -}}/etc/onesignal-bridge{{- end -}}
{{- define "onesignal-bridge.configPath" -}}/etc/onesignal-bridge/config.yaml{{- end -}}

{{/* librdkafka keys that carry a secret (the same regular expression as values.schema.json's
     config.source.consumer patternProperties): passwords, secrets, passphrases, private keys in PEM,
     the Java JAAS line, sasl.oauthbearer.config. */}}
{{- define "onesignal-bridge.consumerSecretKeyPattern" -}}
password|passphrase|secret|jaas|(^|\.)key\.pem$|^ssl_key$|^sasl\.oauthbearer\.config$
{{- end -}}

{{/* Guards: combinations the schema cannot express clearly, with a fix in each message. ---- */}}
{{- define "onesignal-bridge.validate" -}}
{{- $kind := include "onesignal-bridge.sourceKind" . -}}
{{- $replicas := int .Values.replicaCount -}}
{{- if and (eq $kind "postgres") (gt $replicas 2) -}}
{{- fail (printf "replicaCount %d: source.kind postgres has one reader per replication slot; use 1, or 2 for a hot standby (scale out with source.kind kafka)" $replicas) -}}
{{- end -}}
{{- if and (eq $kind "postgres") (eq $replicas 2) (eq (toString .Values.config.source.standby) "false") -}}
{{- fail "replicaCount 2 in postgres mode is a hot standby: it needs config.source.standby: true (the second replica waits on an advisory lock)" -}}
{{- end -}}
{{- if and (eq $kind "outbox") (gt $replicas 1) -}}
{{- fail (printf "replicaCount %d: source.kind outbox runs a single replica (per-user order); use 1 (scale out with source.kind kafka)" $replicas) -}}
{{- end -}}
{{- $shutdown := 10.0 -}}
{{- with .Values.config.delivery -}}
{{- if hasKey . "shutdown_timeout_s" -}}{{- $shutdown = float64 .shutdown_timeout_s -}}{{- end -}}
{{- end -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (addf $shutdown 5.0) -}}
{{- fail (printf "terminationGracePeriodSeconds %v must exceed config.delivery.shutdown_timeout_s (%v) by more than 5 seconds, or pending changes are cut off at SIGKILL" .Values.terminationGracePeriodSeconds $shutdown) -}}
{{- end -}}
{{- $kafkaUser := .Values.secretKeys.kafkaUsername | default "" -}}
{{- $kafkaPassword := .Values.secretKeys.kafkaPassword | default "" -}}
{{- if and (or $kafkaUser $kafkaPassword) (not (and $kafkaUser $kafkaPassword)) -}}
{{- fail "secretKeys.kafkaUsername and secretKeys.kafkaPassword go together: set both or neither" -}}
{{- end -}}
{{- if and (eq $kind "kafka") .Values.setupJob.enabled -}}
{{- fail "setupJob.enabled: source.kind kafka has nothing to create in a database (setup applies the onesignal_bridge schema, publication and slot, or the outbox, for postgres and outbox only): set setupJob.enabled: false" -}}
{{- end -}}
{{- with .Values.networkPolicy.egress -}}
{{- if and .onesignalTo .onesignalExcept -}}
{{- fail "networkPolicy.egress.onesignalExcept narrows onesignalCidr, which onesignalTo replaces: write the exceptions into onesignalTo's ipBlock (except:) instead" -}}
{{- end -}}
{{- end -}}
{{- if eq $kind "kafka" -}}
{{- /* values.schema.json lets a secret-bearing consumer key hold only ${VAR}; VAR must come from a Secret. */ -}}
{{- $pattern := include "onesignal-bridge.consumerSecretKeyPattern" . -}}
{{- $chartVars := list -}}
{{- if and $kafkaUser $kafkaPassword -}}{{- $chartVars = list "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD" -}}{{- end -}}
{{- range $key, $value := (.Values.config.source.consumer | default dict) -}}
{{- if regexMatch $pattern $key -}}
{{- $var := regexReplaceAll "^\\$\\{([A-Za-z_][A-Za-z0-9_]*)\\}$" (toString $value) "${1}" -}}
{{- $found := dict -}}
{{- range $.Values.extraEnv -}}{{- if eq .name $var -}}{{- $found = . -}}{{- end -}}{{- end -}}
{{- if $found -}}
{{- if not (and $found.valueFrom $found.valueFrom.secretKeyRef) -}}
{{- fail (printf "config.source.consumer.%s reads ${%s}, which extraEnv sets without valueFrom.secretKeyRef: put the value in a Secret and read it with valueFrom.secretKeyRef" $key $var) -}}
{{- end -}}
{{- else if and (not (has $var $chartVars)) (not $.Values.extraEnvFrom) -}}
{{- fail (printf "config.source.consumer.%s reads ${%s}, which nothing sets: add {name: %s, valueFrom: {secretKeyRef: {name: <Secret>, key: <key>}}} to extraEnv (SASL credentials: secretKeys.kafkaUsername/kafkaPassword)" $key $var $var) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The bridge's configuration file: values.config plus the secret references and metrics. -- */}}
{{- define "onesignal-bridge.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $kind := include "onesignal-bridge.sourceKind" . -}}
{{- $onesignal := deepCopy (.Values.config.onesignal | default dict) -}}
{{- if not $onesignal.app_id -}}
{{- $_ := set $onesignal "app_id" "${ONESIGNAL_APP_ID}" -}}
{{- end -}}
{{- $_ := set $onesignal "api_key" "${ONESIGNAL_API_KEY}" -}}
{{- $_ := set $cfg "onesignal" $onesignal -}}
{{- $source := deepCopy (.Values.config.source | default dict) -}}
{{- $_ := set $source "kind" $kind -}}
{{- if or (eq $kind "postgres") (eq $kind "outbox") -}}
{{- $_ := set $source "dsn" "${DATABASE_URL}" -}}
{{- end -}}
{{- if and (eq $kind "kafka") .Values.secretKeys.kafkaUsername .Values.secretKeys.kafkaPassword -}}
{{- $consumer := deepCopy ($source.consumer | default dict) -}}
{{- $_ := set $consumer "sasl.username" "${KAFKA_SASL_USERNAME}" -}}
{{- $_ := set $consumer "sasl.password" "${KAFKA_SASL_PASSWORD}" -}}
{{- $_ := set $source "consumer" $consumer -}}
{{- end -}}
{{- $_ := set $cfg "source" $source -}}
{{- if not $cfg.delivery -}}
{{- $_ := unset $cfg "delivery" -}}
{{- end -}}
{{- $_ := set $cfg "metrics" (dict "host" "0.0.0.0" "port" (int .Values.metrics.port)) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Pieces the Deployment and the setup Job share. --------------------------------------- */}}

{{/* The container's environment: the Secret's keys as the variables the configuration reads, then
     extraEnv and extraEnvFrom. Argument: dict "root" (the chart's context) and "databaseUrlKey"
     (the Secret's key for DATABASE_URL). Renders the container's `env:` and `envFrom:` keys. */}}
{{- define "onesignal-bridge.containerEnv" -}}
{{- $v := .root.Values -}}
{{- $kind := include "onesignal-bridge.sourceKind" .root -}}
{{- $secret := include "onesignal-bridge.secretName" .root -}}
env:
  - name: ONESIGNAL_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $v.secretKeys.apiKey }}
  {{- if not $v.config.onesignal.app_id }}
  - name: ONESIGNAL_APP_ID
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $v.secretKeys.appId }}
  {{- end }}
  {{- if or (eq $kind "postgres") (eq $kind "outbox") }}
  - name: DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ .databaseUrlKey }}
  {{- end }}
  {{- if and (eq $kind "kafka") $v.secretKeys.kafkaUsername $v.secretKeys.kafkaPassword }}
  - name: KAFKA_SASL_USERNAME
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $v.secretKeys.kafkaUsername }}
  - name: KAFKA_SASL_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $v.secretKeys.kafkaPassword }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The pod's pull secrets, priority class and security context. */}}
{{- define "onesignal-bridge.podBasics" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The container's image, pull policy and security context. */}}
{{- define "onesignal-bridge.containerBasics" -}}
image: {{ include "onesignal-bridge.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{/* The configuration file and a writable /tmp: the container's `volumeMounts:` (volumeMounts) or
     the pod's `volumes:` (volumes). Argument: dict "root", "configMap" (its name), "part". */}}
{{- define "onesignal-bridge.configVolumes" -}}
{{- if eq .part "volumeMounts" -}}
volumeMounts:
  - name: config
    mountPath: {{ include "onesignal-bridge.configDir" .root }}
    readOnly: true
  - name: tmp
    mountPath: /tmp
{{- else -}}
volumes:
  - name: config
    configMap:
      name: {{ .configMap }}
      items:
        - key: config.yaml
          path: config.yaml
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end -}}
{{- end -}}

{{/* nodeSelector and tolerations (affinity differs: the Deployment adds anti-affinity for replicas);
     empty when neither is set. */}}
{{- define "onesignal-bridge.nodePlacement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The setup Job (templates/setup-job.yaml) ------------------------------------------------ */}}

{{/* Labels of the setup hook's objects and pod: the release's, but not the bridge's selector
     labels, so that neither the Service, the PodDisruptionBudget nor the NetworkPolicy pick up
     the Job's pod. */}}
{{- define "onesignal-bridge.setupLabels" -}}
helm.sh/chart: {{ include "onesignal-bridge.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: setup
{{- end -}}

{{/* What selects the setup Job's pods (and nothing of the bridge's: component differs). */}}
{{- define "onesignal-bridge.setupSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: setup
{{- end -}}

{{- define "onesignal-bridge.setupName" -}}
{{- printf "%s-setup" (include "onesignal-bridge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A pre-install hook runs before the release's ServiceAccount exists: with serviceAccount.create
     the Job gets a hook ServiceAccount of its own (same annotations); otherwise the existing one. */}}
{{- define "onesignal-bridge.setupServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- include "onesignal-bridge.setupName" . -}}
{{- else -}}
{{- include "onesignal-bridge.serviceAccountName" . -}}
{{- end -}}
{{- end -}}

{{/* Hook annotations; argument: the hook weight. Objects made before the Job get a lower weight. */}}
{{- define "onesignal-bridge.setupHook" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}

{{/* PromQL label matchers selecting this release's series. */}}
{{- define "onesignal-bridge.promSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "onesignal-bridge.fullname" .) -}}
{{- end -}}
{{- end -}}
