# Sourced by the scripts: create/refresh .venv idempotently and keep every tool offline and local.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing promptfolio and its dependencies into .venv (first run: a few minutes)" >&2
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[cpu,dev]'; } \
      > .venv/install.log 2>&1; then
    tail -30 .venv/install.log >&2
    echo "installation failed; full log in .venv/install.log" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export PROMPTFOLIO_CACHE="${PROMPTFOLIO_CACHE:-$ROOT/.cache}"
export BENTOML_HOME="${BENTOML_HOME:-$ROOT/.cache/bentoml}"
export BENTOML_DO_NOT_TRACK=true
export UV_CACHE_DIR="${UV_CACHE_DIR:-$ROOT/.cache/uv}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$ROOT/.cache/matplotlib}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$PROMPTFOLIO_CACHE"
