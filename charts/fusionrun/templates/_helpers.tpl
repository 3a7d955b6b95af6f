{{/* Names: every resource name derives from fusionrun.fullname (63-character DNS label limit). */}}
{{- define "fusionrun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fusionrun.fullname" -}}
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

{{- define "fusionrun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource; selectorLabels are the immutable subset the Deployment selects on.
     commonLabels carry no component, so resources of other components (the job ServiceAccount) add theirs. */}}
{{- define "fusionrun.commonLabels" -}}
helm.sh/chart: {{ include "fusionrun.chart" . }}
app.kubernetes.io/name: {{ include "fusionrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fusionrun
{{- end }}

{{- define "fusionrun.labels" -}}
{{ include "fusionrun.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "fusionrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fusionrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "fusionrun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fusionrun.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The stage Jobs' ServiceAccount name; empty when none is created or named (the namespace default). */}}
{{- define "fusionrun.jobServiceAccountName" -}}
{{- if .Values.jobServiceAccount.create }}
{{- default (printf "%s-job" (include "fusionrun.fullname" . | trunc 59 | trimSuffix "-")) .Values.jobServiceAccount.name }}
{{- else }}
{{- .Values.jobServiceAccount.name }}
{{- end }}
{{- end }}

{{/* image: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "fusionrun.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "fusionrun.operatorImage" -}}
{{- include "fusionrun.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "fusionrun.jobImage" -}}
{{- include "fusionrun.imageRef" (dict "image" .Values.jobImage "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* Namespaced mode: the watched namespaces (default: the release namespace), unique, as a list. */}}
{{- define "fusionrun.watchedNamespaces" -}}
{{- $ns := .Values.watch.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* Namespaces that get a job ServiceAccount: the release namespace, the watched ones in namespaced mode,
     and jobServiceAccount.extraNamespaces. */}}
{{- define "fusionrun.jobNamespaces" -}}
{{- $ns := list .Release.Namespace }}
{{- if not .Values.watch.clusterWide }}
{{- $ns = concat $ns (include "fusionrun.watchedNamespaces" . | fromJsonArray) }}
{{- end }}
{{- $ns = concat $ns .Values.jobServiceAccount.extraNamespaces }}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* The operator's namespaced permissions: exactly the API calls of fusionrun_operator.handlers and of
     kopf as the operator configures it (standalone: no peering objects). Shared by the ClusterRole
     (cluster-wide mode) and the per-namespace Roles (namespaced mode). */}}
{{- define "fusionrun.operatorRules" -}}
# FusionRuns: kopf lists and watches them and patches its finalizer and progress annotations; the
# reconciler reads each run afresh (get).
- apiGroups: ["fusionrun.dev"]
  resources: ["fusionruns"]
  verbs: ["get", "list", "watch", "patch"]
# Observed state is written only through the status subresource.
- apiGroups: ["fusionrun.dev"]
  resources: ["fusionruns/status"]
  verbs: ["patch"]
# One Job per task attempt: kopf watches them (a finished Job triggers the next step), the reconciler
# lists, creates, and deletes them (suspend, restartFrom, retries).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
# Multi-node training: a headless Service per training task (deleted with the run by ownerReferences).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# Read only: why a task's pod failed (exit code, OOMKilled, image pull errors) goes into the status.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Events on FusionRuns (kubectl describe shows what happened and why), posted by kopf and the reconciler.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.readSecrets }}
# The Secret a run names (spec.store.credentialsSecret), by name only: the operator checks that it opts in
# (label fusionrun.dev/store-credentials: "true") before any Job gets it, and reads the run's store with it
# (progress, completed tasks, deleteArtifacts). Limited to rbac.secretNames and store.credentialsSecret.
{{- $names := .Values.rbac.secretNames }}
{{- with .Values.store.credentialsSecret }}
{{- $names = append $names . }}
{{- end }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with ($names | uniq) }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
