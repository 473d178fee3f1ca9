{{/* Chart name, truncated to a DNS label. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is set, else repository:tag (tag defaults to appVersion). */}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := .image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .appVersion $image.tag) -}}
{{- end -}}
{{- end }}

{{/* Whether the operator watches every namespace. */}}
{{- define "finetune-operator.clusterWide" -}}
{{- if eq (len .Values.watchNamespaces) 0 }}true{{- end }}
{{- end }}

{{/*
The permissions the operator needs inside each namespace it serves, and nothing more.
tests/chart/test_rbac.py derives the API calls from the operator's code (kopf handlers and
every client call site) and fails when this list misses one or grants anything else.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# The three kinds: kopf lists/watches them and patches its finalizer and progress annotations;
# the operator reads a FineTuneJob before each of its reconciles (AdapterDeployments work
# from the watch alone) and writes only their status.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs", "finetuneschedules"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["adapterdeployments"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status", "adapterdeployments/status", "finetuneschedules/status"]
  verbs: ["patch"]
# A FineTuneSchedule creates its runs (FineTuneJobs), deletes those beyond its history limits,
# and deletes them all when it is deleted.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["create", "delete"]
# Its own namespace (a Role may grant this): a job whose namespace is being deleted is not
# reported as failed when its children go first.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
# Trainer Jobs and their configuration ConfigMaps: created, tracked, cleaned up.
# ConfigMaps are also watched: a change of one a serving vLLM container reads (its --config
# file, VLLM_API_KEY, VLLM_ALLOW_RUNTIME_LORA_UPDATING) wakes its AdapterDeployments, and the
# AdapterDeployment controller reads such a ConfigMap by name (decision 2060).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Multi-node runs: the headless Service the trainer pods rendezvous through.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "create", "delete"]
# Trainer pods (state, progress and results from the trainer's log) and serving pods
# (which replicas serve which adapter; watched, so an idle AdapterDeployment costs no request).
# Trainer pods come through the same watch, and trainer Jobs through one selected by the
# operator's managed-by label, so that pending and finished jobs cost no request (decision 1650).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Headless Services for multi-node training rendezvous (one per multi-node trainer Job).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "create", "delete"]
# Serving: the target vLLM Deployment is watched (AdapterDeployments react to its changes),
# read and patched (adapter arguments and volumes); a canary copy is created next to it and
# deleted after promotion or abort.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Existence checks of what a job references, before anything is created; never listed.
# An AdapterDeployment also reads the Secret holding the API key of a vLLM server started
# with VLLM_API_KEY from a secretKeyRef (sent to that server only, never logged or stored).
- apiGroups: [""]
  resources: ["secrets", "persistentvolumeclaims"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
