#!/usr/bin/env bash
# Copy the alert rules and Grafana dashboards into the chart.
#
# Helm reads no file outside a chart's folder, so the chart carries copies of
# rules/anomaly-monitor.rules.yml and grafana/*.json under files/. Run this after
# changing either; tests/test_helm.py fails while the copies differ.
#   --check   only report differences, and exit 1 if there are any
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
chart_files=$repo_root/helm/anomaly-monitor/files
check_only=false
[[ ${1:-} == --check ]] && check_only=true

differences=0

sync_file() {
    local source=$1 target=$2
    if cmp --silent "$source" "$target"; then
        return
    fi
    differences=$((differences + 1))
    if $check_only; then
        echo "differs: ${target#"$repo_root"/} from ${source#"$repo_root"/}"
    else
        mkdir -p "$(dirname "$target")"
        cp "$source" "$target"
        echo "copied: ${source#"$repo_root"/} -> ${target#"$repo_root"/}"
    fi
}

remove_stale() {
    local target=$1
    differences=$((differences + 1))
    if $check_only; then
        echo "stale: ${target#"$repo_root"/} has no source any more"
    else
        rm "$target"
        echo "removed: ${target#"$repo_root"/}"
    fi
}

sync_file "$repo_root/rules/anomaly-monitor.rules.yml" "$chart_files/rules/anomaly-monitor.rules.yml"

shopt -s nullglob
for dashboard in "$repo_root"/grafana/*.json; do
    sync_file "$dashboard" "$chart_files/dashboards/$(basename "$dashboard")"
done
for copy in "$chart_files"/dashboards/*.json; do
    [[ -f $repo_root/grafana/$(basename "$copy") ]] || remove_stale "$copy"
done

if $check_only && ((differences > 0)); then
    echo "the chart's copies are out of date; run helm/sync-chart-files.sh" >&2
    exit 1
fi
