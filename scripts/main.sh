#!/usr/bin/env bash
# The README's main job: set up (idempotent), then prepare MovieLens-100K with MiniLM text features
# (skipped when already there), train MISSRec, evaluate the best checkpoint on test, and print the
# model's test row next to the popularity / Markov / item-kNN baselines of the same protocol.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh train.epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/missrec train --config ml100k-transductive "$@" | tee "$log"
run=$(sed -n 's/^run folder //p' "$log" | head -n 1)
.venv/bin/missrec inspect data/ml-100k --rows 0
.venv/bin/missrec baselines --split test --run "$run" --label "MISSRec (ml100k-transductive)" ml100k-transductive "$@"
# The model learns not to repeat watched movies (model.repeat_bias); the same baselines with the
# watched movies removed from their lists show how much of its lead that alone explains.
echo "the same baselines with each user's watched movies removed from their lists:"
.venv/bin/missrec baselines --split test ml100k-transductive eval.mask_history=true "$@"
