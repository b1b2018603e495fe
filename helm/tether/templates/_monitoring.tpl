{{/* The scrape endpoint shared by the PodMonitor and the ServiceMonitor. */}}
{{- define "tether.scrapeEndpoint" -}}
port: http
path: /metrics
scheme: {{ include "tether.scheme" . }}
{{- if .Values.metrics.tlsConfig }}
tlsConfig:
  {{- toYaml .Values.metrics.tlsConfig | nindent 2 }}
{{- else if include "tether.tlsOn" . }}
tlsConfig:
  insecureSkipVerify: true
{{- end }}
{{- end -}}
