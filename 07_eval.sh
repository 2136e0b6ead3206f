#!/usr/bin/env bash
# 07_eval.sh — stage 7: the base model and the MIA-DPO model, side by side.
#   bash 07_eval.sh                          # toy: models/toy-llava vs out/dpo-toy on the held-out benchmark
#   SPLIT=dev bash 07_eval.sh                # the dev benchmark (tune on this one, never on held-out)
#   BASE=models/toy-llava DPO=out/dpo-x OUT=out/eval-x bash 07_eval.sh
#   bash 07_eval.sh --vlmevalkit --model base=llava-1.5-7b-hf --model dpo=out/mia-dpo/final   # the paper's benchmarks
#   bash 07_eval.sh --lmms-eval --model base=llava-1.5-7b-hf --model dpo=out/mia-dpo/final    # ... through lmms-eval
#
# The toy benchmark is made by the same stages as the training data, from the split's scenes:
# one first-turn question per source row in each format — sequences of 2-5 images (equal
# shares), grid collages (01-03's mix of 2-9 cells), pic-in-pic — plus the split's own
# single-image questions. Then 07_eval.py answers every question with each model (greedy,
# exact match) and prints accuracy by group and the errors by hallucination type.
# Extra arguments go to 07_eval.py (e.g. --limit 200, --batch-size 64, --threads 2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts; data and models are found from the current directory
PY=${PYTHON:-python}
if [[ " $* " == *" --vlmevalkit "* || " $* " == *" --lmms-eval "* ]]; then exec "$PY" "$HERE/07_harness.py" "$@"; fi

SPLIT=${SPLIT:-heldout}
BASE=${BASE:-models/toy-llava}
DPO=${DPO:-out/dpo-toy}
OUT=${OUT:-out/eval-$SPLIT}
BENCH=${BENCH:-data/toy/eval-$SPLIT}
ROOT=data/toy/images

if [[ ! -f $BENCH/pip.jsonl ]]; then  # built once; the files are written atomically, pip last
  echo "07: building the $SPLIT benchmark in $BENCH"
  common=(--data "data/toy/$SPLIT.json" --image-root "$ROOT" --first-turn-only --seed 1 --limit 0)  # every row
  "$PY" "$HERE/01_make_sequence.py" "${common[@]}" --counts 2:1,3:1,4:1,5:1 --out "$BENCH/sequence.jsonl"
  "$PY" "$HERE/02_make_grid.py" "${common[@]}" --out "$BENCH/grid.jsonl" --image-out "$ROOT/eval_${SPLIT}_grid"
  "$PY" "$HERE/03_make_pip.py" "${common[@]}" --out "$BENCH/pip.jsonl" --image-out "$ROOT/eval_${SPLIT}_pip"
fi

models=(--model "base=$BASE" --model "dpo=$DPO")
if [[ " $* " == *" --model "* ]]; then models=(); fi  # models given on the command line replace BASE/DPO
exec "$PY" "$HERE/07_eval.py" "${models[@]}" --image-root "$ROOT" \
  --data "data/toy/$SPLIT.json" "$BENCH/sequence.jsonl" "$BENCH/grid.jsonl" "$BENCH/pip.jsonl" \
  --scenes "data/toy/$SPLIT.json" --out "$OUT" "$@"
