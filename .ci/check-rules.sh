#!/usr/bin/env bash
# Check the alerting rules and the example Alertmanager configuration with the
# Prometheus tools: promtool (Debian package prometheus) and amtool (Debian package
# prometheus-alertmanager). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname -- "$0")/.."

for tool in promtool amtool; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found on PATH. Install the Debian packages prometheus and prometheus-alertmanager." >&2
    exit 1
  fi
done

promtool check rules rules/anomaly-monitor.rules.yml
promtool test rules rules/tests/*.yml
amtool check-config rules/alertmanager.yml

# expect_receiver RECEIVER LABEL=VALUE...: fail unless the labels route to RECEIVER.
expect_receiver() {
  local receiver=$1
  shift
  if ! amtool config routes test --config.file=rules/alertmanager.yml --verify.receivers="$receiver" "$@" \
    >/dev/null 2>&1; then
    echo "error: labels $* do not route to the receiver $receiver in rules/alertmanager.yml" >&2
    exit 1
  fi
}

expect_receiver pager alertname=AnomalyMonitorEntityHighlyAnomalous severity=critical detector=node entity=node-a:9100
expect_receiver ticket alertname=AnomalyMonitorEntityAnomalous severity=warning detector=node entity=node-a:9100
expect_receiver ticket alertname=AnomalyMonitorDown severity=warning
echo "rules and Alertmanager configuration: OK"
