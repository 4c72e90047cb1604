{{- define "edgewise.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "edgewise.labels" -}}
app.kubernetes.io/name: edgewise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "edgewise.credentialKeysSecret" -}}
{{ .Values.gateway.credentialKeys.secretName | default (printf "%s-credential-keys" .Release.Name) }}
{{- end -}}

{{- define "edgewise.env" -}}
- name: EDGEWISE_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: HOSTNAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: EDGEWISE_CLICKHOUSE_URL
  value: {{ .Values.clickhouse.url | quote }}
- name: EDGEWISE_CLICKHOUSE_USER
  value: {{ .Values.clickhouse.user | quote }}
{{- if .Values.clickhouse.passwordSecret }}
- name: EDGEWISE_CLICKHOUSE_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .Values.clickhouse.passwordSecret }}, key: password}}
{{- end }}
{{- if .Values.s3.endpoint }}
- name: EDGEWISE_S3_ENDPOINT
  value: {{ .Values.s3.endpoint | quote }}
{{- end }}
- name: EDGEWISE_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: EDGEWISE_S3_PATH_STYLE
  value: {{ .Values.s3.pathStyle | quote }}
- name: EDGEWISE_S3_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ .Values.s3.credentialsSecret }}, key: accessKeyId}}
- name: EDGEWISE_S3_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.s3.credentialsSecret }}, key: secretAccessKey}}
- name: EDGEWISE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: edgewise-operator
{{- end }}
{{- end -}}
