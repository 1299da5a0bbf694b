#!/usr/bin/env bash
# Run the detection benchmark that docs/benchmarks.md reports: every SMD machine and ASD server
# that the data folder holds, and both Nezha systems.
# Needs ANOMALY_DATASETS_DIR (or --data-dir passed through EXTRA). Writes under results/.
# The training budget (epochs, windows) and the retraining interval are cut so that the whole
# run takes about half an hour on 2 CPU cores. Every other detector setting is the service
# default. SMD runs beside ASD and then Nezha, one torch thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/benchmark}
COMMON=(--seeds 0,1,2 --deployed-seeds 1 --epochs 10 --max-windows 4000 --torch-threads 1 ${EXTRA:-})
mkdir -p "$OUT"

"$PY" -m monitor evaluate --dataset smd --train-every 1d "${COMMON[@]}" --out "$OUT/smd" > "$OUT/smd.log" 2>&1 &
smd=$!
"$PY" -m monitor evaluate --dataset asd --train-every 1d "${COMMON[@]}" --out "$OUT/asd" > "$OUT/asd.log" 2>&1
"$PY" -m monitor evaluate --dataset nezha --train-every 1h "${COMMON[@]}" --out "$OUT/nezha" > "$OUT/nezha.log" 2>&1
wait "$smd"
