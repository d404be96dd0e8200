{{/* Names, labels and API versions shared by the templates. */}}

{{/* The release's object names: fullnameOverride, else <release>-<nameOverride or chart>, or the
     release name alone where it already contains that name. 40 characters leave room for the
     longest suffix (-kubelet-plugin, -metrics-reader) within a label value's 63. */}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tessera.pluginName" -}}{{ include "tessera.fullname" . }}-kubelet-plugin{{- end -}}
{{- define "tessera.controllerName" -}}{{ include "tessera.fullname" . }}-controller{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tessera.pluginSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: kubelet-plugin
{{- end -}}

{{- define "tessera.controllerSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* An image: (list $ <component's image values>). The registry is global.imageRegistry, else
     image.registry; a digest pins the image and wins over the tag. */}}
{{- define "tessera.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $registry := default $root.Values.image.registry (($root.Values.global | default dict).imageRegistry) -}}
{{- $name := printf "%s/%s" $registry $image.repository -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $name $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $name (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Kubernetes minor version, as an int (helm's .Capabilities.KubeVersion.Minor may be "31+"). */}}
{{- define "tessera.kubeMinor" -}}
{{- regexFind "^[0-9]+" .Capabilities.KubeVersion.Minor | default "0" -}}
{{- end -}}

{{/*
resource.k8s.io version for DeviceClasses: the value if set; else the newest the cluster serves
(a real cluster's discovery lists "group/version/Kind"); else, rendering offline, from the
Kubernetes version (1.34+ v1, 1.32-1.33 v1beta1, 1.31 v1alpha3).
*/}}
{{- define "tessera.resourceApiVersion" -}}
{{- $caps := .Capabilities.APIVersions -}}
{{- if .Values.resourceApiVersion -}}
{{- .Values.resourceApiVersion -}}
{{- else if $caps.Has "resource.k8s.io/v1/DeviceClass" -}}
resource.k8s.io/v1
{{- else if $caps.Has "resource.k8s.io/v1beta2/DeviceClass" -}}
resource.k8s.io/v1beta2
{{- else if $caps.Has "resource.k8s.io/v1beta1/DeviceClass" -}}
resource.k8s.io/v1beta1
{{- else if $caps.Has "resource.k8s.io/v1alpha3/DeviceClass" -}}
resource.k8s.io/v1alpha3
{{- else -}}
{{- $minor := include "tessera.kubeMinor" . | int -}}
{{- if ge $minor 34 -}}resource.k8s.io/v1
{{- else if ge $minor 32 -}}resource.k8s.io/v1beta1
{{- else -}}resource.k8s.io/v1alpha3
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether to render the prometheus-operator objects: "true" or "". */}}
{{- define "tessera.monitoring" -}}
{{- $mode := toString .Values.monitoring.enabled -}}
{{- if eq $mode "true" -}}true
{{- else if eq $mode "auto" -}}
{{- if or (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}true{{- end -}}
{{- else if ne $mode "false" -}}
{{- fail (printf "monitoring.enabled must be auto, true or false, not %q" $mode) -}}
{{- end -}}
{{- end -}}

{{/* Rolling updates with two plugin instances per node: "true" or "". */}}
{{- define "tessera.surge" -}}
{{- $mode := toString .Values.kubeletPlugin.rollingUpdate -}}
{{- if eq $mode "auto" -}}
{{- if ge (include "tessera.kubeMinor" . | int) 33 -}}true{{- end -}}
{{- else if eq $mode "surge" -}}true
{{- else if ne $mode "replace" -}}
{{- fail (printf "kubeletPlugin.rollingUpdate must be auto, surge or replace, not %q" $mode) -}}
{{- end -}}
{{- end -}}

{{/* The GpuConfig parameters of a class: corePolicy and priority from a dict. */}}
{{- define "tessera.gpuConfig" -}}
{{- $policy := .corePolicy | default "default" -}}
{{- $priority := .priority | default "normal" -}}
{{- if not (has $policy (list "default" "force")) -}}
{{- fail (printf "DeviceClass %s: corePolicy must be default or force, not %q" .name $policy) -}}
{{- end -}}
{{- if not (has $priority (list "high" "normal" "low")) -}}
{{- fail (printf "DeviceClass %s: priority must be high, normal or low, not %q" .name $priority) -}}
{{- end -}}
- opaque:
    driver: gpu.tessera.dev
    parameters:
      apiVersion: gpu.tessera.dev/v1alpha1
      kind: GpuConfig
      corePolicy: {{ $policy | quote }}
      priority: {{ $priority | quote }}
{{- end -}}
