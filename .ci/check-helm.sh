#!/usr/bin/env bash
# Install helm if needed, then run the chart and image tests.
#
# The checks themselves live in tests/test_helm.py (lint, render, kubernetes-validate,
# promtool, rendered objects, schema) and tests/test_image.py (the Dockerfile's install
# steps in a fresh venv, the CLI as a non-root user), so failures show in the pytest run.
#   PYTHON   interpreter with pytest and kubernetes-validate (default .venv/bin/python)
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo_root/.venv/bin/python}

bash "$repo_root/.ci/install-helm.sh"
export HELM_BIN=${HELM_BIN:-$repo_root/.tools/bin/helm}

cd "$repo_root"
"$python" -m pytest tests/test_helm.py tests/test_image.py -q "$@"
