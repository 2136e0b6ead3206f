#!/usr/bin/env bash
# run.sh — the README's two commands. Each sets up .venv on first use, then:
#   bash run.sh demo    the toy pipeline end to end on the CPU (the embedded default)
#   bash run.sh test    the test suite
# On a GPU machine, create .venv and install your own CUDA build of torch first; this
# script only installs torch (the CPU build it was tested with) when none is importable.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {  # $1: requirements file
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  local stamp="$VENV/.installed-$(basename "$1" .txt)"
  local want; want=$(cat requirements*.txt | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -m pip install -q -r "$1"
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  demo)
    setup requirements.txt
    # The toy pipeline, stage by stage, each with its defaults (paths under data/toy, models/).
    "$PY" 00_make_toy.py
    "$PY" 01_make_sequence.py --limit 1000
    "$PY" 02_make_grid.py --limit 1000
    "$PY" 03_make_pip.py --limit 1000
    "$PY" 04_gen_pairs.py
    "$PY" 05_post_select.py --trl-out data/toy/pairs.trl.jsonl
    "$PY" 06_train_dpo.py --pairs data/toy/pairs.post.jsonl
    echo "07_eval.sh (evaluation and the before/after table): not implemented yet (issue 7)."
    ;;
  test)
    setup requirements-test.txt
    shift
    "$PY" -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: bash run.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
