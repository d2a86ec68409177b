#!/usr/bin/env bash
# Issue 15's scale run on one machine: a synthetic catalogue of ITEMS items (default 1e7) with two
# 128-d float16 feature tables, 10 x ITEMS interactions, then on 2 ranks (torchrun, gloo) training
# with configs/scale-1e7.yaml (sampled softmax, row-wise tables, an ID table, K = 65,536 interests
# clustered by faiss, STEPS steps, evaluation of EVAL_USERS users), `missrec score` of EXACT_USERS
# users exactly (each rank scans its own items) and of SCORE_USERS users with `--ann ivf --ann-bits 4`
# (each rank searches an index of its own items), whose recall@100 against exact scoring is measured
# by a separate run over RECALL_USERS users. Every rank logs each phase's seconds and peak RSS (log.resources); the last
# step prints them as a table (bench/scale.py --logs). bench/scale.py runs this script at 1e5 and 1e6.
#
#   bash scripts/scale.sh [OUT]           # OUT defaults to data/scale-ITEMS
#   ITEMS=1000000 bash scripts/scale.sh /tmp/scale-1e6
#
# OUT/dataset is made once (an existing complete one is reused), OUT/run is trained once (a run
# without results.json is started over), scoring runs every time. Logs: OUT/logs/<step>.log, and
# OUT/logs/<step>.time from /usr/bin/time -v where it exists (wall and CPU time; its maximum RSS is
# only the last phase's, since log.resources resets the high-water mark as each phase starts: the
# resources lines in the .log hold every phase's peak per rank).
# Environment: ITEMS, INTERACTIONS (default 10 x ITEMS), STEPS (300), EVAL_USERS (4096), EXACT_USERS
# (2000), SCORE_USERS (100000), RECALL_USERS (1000), TRAIN_ARGS (more train overrides), PY.
set -euo pipefail
cd "$(dirname "$0")/.."

ITEMS=${ITEMS:-10000000}
INTERACTIONS=${INTERACTIONS:-$((10 * ITEMS))}
STEPS=${STEPS:-300}
EVAL_USERS=${EVAL_USERS:-4096}
EXACT_USERS=${EXACT_USERS:-2000}
SCORE_USERS=${SCORE_USERS:-100000}
RECALL_USERS=${RECALL_USERS:-1000}
TRAIN_ARGS=${TRAIN_ARGS:-}
PY=${PY:-.venv/bin/python}
OUT=${1:-data/scale-$ITEMS}
DATA=$OUT/dataset
RUN=$OUT/run
LOGS=$OUT/logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOGS"

TIME=()
if [ -x /usr/bin/time ]; then TIME=(/usr/bin/time -v -o); fi

# step NAME COMMAND...: run it with its output in LOGS/NAME.log; one line with its wall time.
step() {
    local name=$1 start
    shift
    echo "== $name: $*"
    start=$(date +%s)
    if ! "${TIME[@]}" ${TIME:+"$LOGS/$name.time"} "$@" >"$LOGS/$name.log" 2>&1; then
        tail -n 20 "$LOGS/$name.log"
        echo "$name failed; its log: $LOGS/$name.log" >&2
        exit 1
    fi
    echo "   $name: $(($(date +%s) - start)) s"
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m missrec_torchrec.cli)

if [ ! -f "$DATA/stats.json" ]; then
    step prepare "$PY" -m missrec_torchrec.cli prepare synthetic --out "$DATA" --overwrite --items "$ITEMS" \
        --interactions "$INTERACTIONS" --modalities text:128,image:128 --dtype float16
fi
if [ ! -f "$RUN/results.json" ]; then
    rm -rf "$RUN"
    # shellcheck disable=SC2086 # TRAIN_ARGS is a list of overrides
    step train "${TORCHRUN[@]}" train --config scale-1e7 data.dataset="$DATA" checkpoint.run_dir="$RUN" \
        train.max_steps_per_epoch="$STEPS" eval.max_users="$EVAL_USERS" $TRAIN_ARGS
fi
step score "${TORCHRUN[@]}" score --checkpoint "$RUN" --out "$OUT/scores-exact.parquet" --overwrite \
    eval.max_users="$EXACT_USERS"
# 4-bit codes: the indexes are ~half the 8-bit ones' size, and recall barely moves (README).
step score-ann "${TORCHRUN[@]}" score --checkpoint "$RUN" --out "$OUT/scores.parquet" --overwrite \
    --ann ivf --ann-bits 4 eval.max_users="$SCORE_USERS"
# Recall on its own run: the exact scans of a sample, made beside the indexes, would add their own
# transients to the batch-scoring run's memory, which is what the bound is about.
step recall "${TORCHRUN[@]}" score --checkpoint "$RUN" --out "$OUT/scores-recall.parquet" --overwrite \
    --ann ivf --ann-bits 4 --recall-sample "$RECALL_USERS" eval.max_users="$RECALL_USERS"
"$PY" bench/scale.py --logs "$LOGS"
