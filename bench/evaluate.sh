#!/usr/bin/env bash
# Run the detection benchmark that docs/benchmarks.md reports: every SMD machine and ASD server
# that the data folder holds, both Nezha systems and every NAB series.
# Needs ANOMALY_DATASETS_DIR (or --data-dir passed through EXTRA). Writes under results/.
# The training budget (epochs, windows) is cut so that the whole run takes about an hour on
# 2 CPU cores. SMD and ASD retrain on the service's default schedule (every 6 h); Nezha's test
# days are a few hours long, so it retrains every hour. Every other detector setting is the
# service default. Each data set runs JOBS units at once, one torch thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/benchmark}
JOBS=${JOBS:-2}
COMMON=(--seeds 0,1,2 --deployed-seeds 1 --epochs 10 --max-windows 4000 --torch-threads 1 --jobs "$JOBS" ${EXTRA:-})
mkdir -p "$OUT"

"$PY" -m monitor evaluate --dataset smd "${COMMON[@]}" --out "$OUT/smd" > "$OUT/smd.log" 2>&1
"$PY" -m monitor evaluate --dataset asd "${COMMON[@]}" --out "$OUT/asd" > "$OUT/asd.log" 2>&1
"$PY" -m monitor evaluate --dataset nezha --train-every 1h "${COMMON[@]}" --out "$OUT/nezha" > "$OUT/nezha.log" 2>&1
"$PY" -m monitor evaluate --dataset nab "${COMMON[@]}" --out "$OUT/nab" > "$OUT/nab.log" 2>&1
