#!/usr/bin/env bash
# Create or update .venv-airflow: Apache Airflow in its own virtualenv, for the DAG tests (and as a
# template for the Airflow host). Idempotent: a stamp derived from the pins below skips pip when
# nothing changed. Works on a fresh machine from PyPI alone: Airflow's constraints file lives on
# GitHub (not always reachable), so the version is pinned and pip resolves the rest.
# The DAGs never import marketd: the ticker monitor calls the daemon's own `marketd` executable
# (MARKETD_BIN), so the daemon's dependencies are not installed here.
#   scripts/airflow-venv.sh            creates/updates ./.venv-airflow
#   AIRFLOW_VENV=/opt/airflow scripts/airflow-venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${AIRFLOW_VENV:-$PWD/.venv-airflow}
python=${PYTHON:-python3}
# pyarrow: the data-quality DAG reads the trade-aggregation Parquet output.
pins=(
  "apache-airflow==3.3.2"
  "pyarrow>=15"
)

"$python" - <<'PY' || { echo "airflow-venv: Python >= 3.10 is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

stamp="$venv/.marketd-airflow-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -x "$venv/bin/airflow" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "airflow-venv: installing ${pins[*]} into $venv (about a minute)" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -m pip check >/dev/null || {
  echo "airflow-venv: pip check reports conflicts:" >&2
  "$venv/bin/python" -m pip check >&2
  exit 1
}
rm -f "$venv"/.marketd-airflow-*
touch "$stamp"
