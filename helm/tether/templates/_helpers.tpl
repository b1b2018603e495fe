{{/*
Names. Kubernetes names are at most 63 characters; a StatefulSet's at most 52 (its pods carry
a controller-revision-hash label of the name plus 11 characters), which also leaves room
for the headless Service's "-headless" suffix.
*/}}
{{- define "tether.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tether.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tether.headless" -}}
{{- printf "%s-headless" (include "tether.fullname" .) -}}
{{- end -}}

{{- define "tether.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Frozen forever: changing these makes `helm upgrade` fail on the StatefulSet. */}}
{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{/* On the headless Service only: what the ServiceMonitor selects (not the device
Service, which has the same selector labels: every pod would be scraped twice). */}}
{{- define "tether.headlessLabels" -}}
tether/service: headless
{{- end -}}

{{- define "tether.labels" -}}
helm.sh/chart: {{ include "tether.chart" . }}
{{ include "tether.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels for objects that are not nodes (the test pod). */}}
{{- define "tether.labelsFor" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "tether.chart" $ctx }}
app.kubernetes.io/name: {{ include "tether.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ $ctx.Values.image.tag | default $ctx.Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tether.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tether.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tether.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* DNS names. */}}
{{- define "tether.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "tether.serviceFqdn" -}}
{{- printf "%s.%s" (include "tether.fullname" .) (include "tether.svcDomain" .) -}}
{{- end -}}

{{- define "tether.headlessFqdn" -}}
{{- printf "%s.%s" (include "tether.headless" .) (include "tether.svcDomain" .) -}}
{{- end -}}

{{- define "tether.tlsOn" -}}
{{- if ne .Values.tls.mode "none" }}true{{ end -}}
{{- end -}}

{{- define "tether.scheme" -}}
{{- if include "tether.tlsOn" . }}https{{ else }}http{{ end -}}
{{- end -}}

{{- define "tether.tlsSecretName" -}}
{{- if eq .Values.tls.mode "certManager" -}}
{{- printf "%s-tls" (include "tether.fullname" .) -}}
{{- else -}}
{{- .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The URL registration hands to devices. */}}
{{- define "tether.publicUrl" -}}
{{- if .Values.publicUrl -}}
{{- .Values.publicUrl -}}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- printf "https://%s" (index .Values.ingress.hosts 0).host -}}
{{- else -}}
{{- printf "%s://%s:%v" (include "tether.scheme" .) (include "tether.serviceFqdn" .) .Values.service.port -}}
{{- end -}}
{{- end -}}

{{/* The FoundationDB cluster file inside the pod's writable directory. */}}
{{- define "tether.fdbClusterFile" -}}
/var/lib/tether/fdb.cluster
{{- end -}}

{{/*
Cross-field rules the schema cannot express; each fails the render with what to change.
*/}}
{{- define "tether.validate" -}}
{{- $v := .Values -}}
{{- if not $v.clusterSecret.existingSecret -}}
{{- fail "clusterSecret.existingSecret is required: create a Secret with the cluster secret (at least 16 random bytes, e.g. `kubectl create secret generic tether-cluster --from-literal=cluster-secret=$(head -c 32 /dev/urandom | base64)`) and name it here. The chart never generates one: a secret regenerated on upgrade would split the cluster." -}}
{{- end -}}
{{- if or (not $v.mfgKeys.existingSecret) (not $v.mfgKeys.items) -}}
{{- fail "mfgKeys.existingSecret and mfgKeys.items are required: devices prove themselves with credentials derived from the manufacturing keys (`tether admin mfg-key generate k1.key`, then `kubectl create secret generic tether-mfg --from-file=k1.key`, and items: [{id: k1, key: k1.key}])." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "existingSecret") (not $v.tls.existingSecret) -}}
{{- fail "tls.mode is existingSecret but tls.existingSecret is empty: name a kubernetes.io/tls Secret, or use tls.mode certManager (or none behind an Ingress that terminates TLS)." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "certManager") (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "tls.mode is certManager but tls.certManager.issuerRef.name is empty: name the cert-manager Issuer or ClusterIssuer that signs the nodes' certificate." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "none") (eq $v.service.type "LoadBalancer") (not $v.tls.allowPlainLoadBalancer) -}}
{{- fail "tls.mode is none but service.type is LoadBalancer: devices would send their credentials in clear text to the internet. Use tls.mode existingSecret/certManager, or set tls.allowPlainLoadBalancer=true if that load balancer terminates TLS itself." -}}
{{- end -}}
{{- if eq $v.store.type "postgres" -}}
{{- $pg := $v.store.postgres -}}
{{- if not $pg.existingSecret -}}
{{- fail "store.postgres.existingSecret is required: the PostgreSQL URL (store.postgres.urlKey) or password (store.postgres.passwordKey) comes from a Secret, never from a command-line argument." -}}
{{- end -}}
{{- if and $pg.urlKey (or $pg.url $pg.passwordKey) -}}
{{- fail "store.postgres: give either urlKey (the whole URL in the Secret) or url + passwordKey, not both." -}}
{{- end -}}
{{- if and (not $pg.urlKey) (not (and $pg.url $pg.passwordKey)) -}}
{{- fail "store.postgres: set urlKey (a Secret key holding postgres://user:password@host:5432/db), or url (postgres://user@host:5432/db, no password) together with passwordKey." -}}
{{- end -}}
{{- if and $pg.url (regexMatch "^[a-z]+://[^/@]*:[^/@]*@" $pg.url) -}}
{{- fail "store.postgres.url carries a password: it would be visible in the pod spec and in `ps`. Put the password in the Secret under store.postgres.passwordKey." -}}
{{- end -}}
{{- else if eq $v.store.type "fdb" -}}
{{- if not $v.store.fdb.clusterFileConfigMap -}}
{{- fail "store.type is fdb but store.fdb.clusterFileConfigMap is empty: name the ConfigMap the FoundationDB operator publishes for the cluster (<cluster>-config)." -}}
{{- end -}}
{{- end -}}
{{- $s := $v.shutdown -}}
{{- $need := add $s.preStopSleepSeconds $s.drainTimeoutSeconds 5 -}}
{{- if lt (int $s.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%v) must be at least shutdown.preStopSleepSeconds (%v) + shutdown.drainTimeoutSeconds (%v) + 5 = %v: Kubernetes kills the pod when the grace period ends, in the middle of its drain (held subscriptions unanswered, queued writes failed)." $s.terminationGracePeriodSeconds $s.preStopSleepSeconds $s.drainTimeoutSeconds $need) -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable, not both (set the other to null)." -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%v) exceeds autoscaling.maxReplicas (%v)." $v.autoscaling.minReplicas $v.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage." -}}
{{- end -}}
{{- if and $v.push.webhook (not $v.push.existingSecret) -}}
{{- fail "push.webhook needs push.existingSecret: wake-ups are signed with a key from a Secret (`kubectl create secret generic tether-push --from-literal=push-secret=$(head -c 32 /dev/urandom | base64)`), and the gateway checks X-Tether-Signature with the same key." -}}
{{- end -}}
{{- if and (hasPrefix "https://" $v.push.webhook) (not $v.push.caConfigMap) -}}
{{- fail "push.webhook is https but push.caConfigMap is empty: the image carries no CA bundle, so name a ConfigMap with the CAs (PEM) the gateway's certificate chains to." -}}
{{- end -}}
{{- if eq $v.ports.http $v.ports.grpc -}}
{{- fail "ports.http and ports.grpc must differ." -}}
{{- end -}}
{{- if and $v.metrics.podMonitor.enabled $v.metrics.serviceMonitor.enabled -}}
{{- fail "metrics.podMonitor and metrics.serviceMonitor are both enabled: every pod would be scraped twice and every sum in the alerts and dashboards doubled. Enable one (podMonitor scrapes pods directly; serviceMonitor for a Prometheus that selects only ServiceMonitors)." -}}
{{- end -}}
{{- end -}}

{{/* A probe with the scheme set from tls.mode unless the values set one. */}}
{{- define "tether.probe" -}}
{{- $ctx := index . 0 -}}
{{- $probe := deepCopy (index . 1) -}}
{{- if hasKey $probe "httpGet" -}}
{{- if not (hasKey $probe.httpGet "scheme") -}}
{{- $_ := set $probe.httpGet "scheme" (upper (include "tether.scheme" $ctx)) -}}
{{- end -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end -}}
