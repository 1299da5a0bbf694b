{{/*
Pod template shared by the Deployment and the StatefulSet.
*/}}
{{- define "anomaly-monitor.podTemplate" -}}
metadata:
  labels:
    {{- include "anomaly-monitor.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- /* A changed config renders a new checksum, and the new pod template rolls the pods. */}}
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "anomaly-monitor.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  containers:
    - name: anomaly-monitor
      image: {{ include "anomaly-monitor.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --log-level={{ .Values.logLevel }}
        - --log-format={{ .Values.logFormat }}
        - run
      env:
        - name: ANOMALY_MONITOR_CONFIG
          value: {{ include "anomaly-monitor.configDir" . }}/config/config.yaml
        {{- /* Libraries that cache under $HOME write into the /tmp emptyDir on a read-only root. */}}
        - name: HOME
          value: /tmp
        {{- if .Values.sharding.enabled }}
        - name: ANOMALY_MONITOR_SHARD_COUNT
          value: {{ .Values.sharding.replicas | quote }}
        {{- if eq .Values.sharding.indexSource "podIndexLabel" }}
        - name: ANOMALY_MONITOR_SHARD_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- else }}
        {{- /*
        With `shard.index: auto` the service reads the ordinal from the end of $HOSTNAME.
        Container runtimes set it to the pod's host name; the pod name is set here so a
        custom `hostname` in the pod spec cannot change the shard.
        */}}
        - name: HOSTNAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- end }}
        {{- end }}
        {{- if and .Values.auth.basicAuth.existingSecret (eq .Values.auth.basicAuth.passwordFrom "env") }}
        - name: ANOMALY_MONITOR_BASIC_AUTH_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ .Values.auth.basicAuth.existingSecret }}
              key: {{ .Values.auth.basicAuth.passwordKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
      {{- with .Values.startupProbe }}
      startupProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "anomaly-monitor.configDir" . }}/config
          readOnly: true
        - name: data
          mountPath: {{ .Values.persistence.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- if .Values.auth.bearerToken.existingSecret }}
        - name: bearer-token
          mountPath: {{ include "anomaly-monitor.configDir" . }}/secrets/bearer-token
          readOnly: true
        {{- end }}
        {{- if and .Values.auth.basicAuth.existingSecret (eq .Values.auth.basicAuth.passwordFrom "file") }}
        - name: basic-auth
          mountPath: {{ include "anomaly-monitor.configDir" . }}/secrets/basic-auth
          readOnly: true
        {{- end }}
        {{- if or .Values.auth.ca.existingSecret .Values.auth.ca.existingConfigMap }}
        - name: ca
          mountPath: {{ include "anomaly-monitor.configDir" . }}/secrets/ca
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "anomaly-monitor.fullname" . }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if not .Values.persistence.enabled }}
    - name: data
      emptyDir: {}
    {{- else if not .Values.sharding.enabled }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ default (include "anomaly-monitor.fullname" .) .Values.persistence.existingClaim }}
    {{- end }}
    {{- with .Values.auth.bearerToken.existingSecret }}
    - name: bearer-token
      secret:
        secretName: {{ . }}
        items:
          - key: {{ $.Values.auth.bearerToken.key }}
            path: {{ $.Values.auth.bearerToken.key }}
    {{- end }}
    {{- if and .Values.auth.basicAuth.existingSecret (eq .Values.auth.basicAuth.passwordFrom "file") }}
    - name: basic-auth
      secret:
        secretName: {{ .Values.auth.basicAuth.existingSecret }}
        items:
          - key: {{ .Values.auth.basicAuth.passwordKey }}
            path: {{ .Values.auth.basicAuth.passwordKey }}
    {{- end }}
    {{- with .Values.auth.ca.existingSecret }}
    - name: ca
      secret:
        secretName: {{ . }}
        items:
          - key: {{ $.Values.auth.ca.key }}
            path: {{ $.Values.auth.ca.key }}
    {{- end }}
    {{- with .Values.auth.ca.existingConfigMap }}
    - name: ca
      configMap:
        name: {{ . }}
        items:
          - key: {{ $.Values.auth.ca.key }}
            path: {{ $.Values.auth.ca.key }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
