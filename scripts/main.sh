#!/usr/bin/env bash
# The README's main job: set up (idempotent), then prepare MovieLens-100K with MiniLM text features
# (skipped when already there), train MISSRec a few epochs, and evaluate the best checkpoint on test.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh train.epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/missrec train --config ml100k "$@"
.venv/bin/missrec inspect data/ml-100k --rows 0
