#!/usr/bin/env bash
# run.sh — the README's two commands. Each sets up .venv on first use, then:
#   bash run.sh demo    the toy pipeline end to end on the CPU (the embedded default)
#   bash run.sh test    the test suite
#   bash run.sh effect  the ablation (which pairs, which loss terms, a second round) over three seeds, behind the README's numbers
#   bash run.sh test-gpu-lane   the family tests where a GPU user's torch + torchvision are installed (their own venv)
# On a GPU machine, create .venv and install your own CUDA build of torch first; this
# script only installs torch (the CPU build it was tested with) when none is importable.
set -euo pipefail
cd "$(dirname "$0")"
VENV=$(realpath -m "${VENV:-.venv}")  # absolute: stages also run from other directories
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

harness_setup() {  # lmms-eval for tests/test_harness.py; --no-deps: its own requirements pull torchvision
  local stamp="$VENV/.installed-harness" want; want=$(sha256sum < requirements-harness.txt | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -m pip install -q -r requirements-harness.txt && "$PY" -m pip install -q --no-deps lmms-eval==0.7.3
    echo "$want" > "$stamp"
  fi
}

# The GPU-user lane: transformers picks its torchvision image processors wherever torchvision imports
# (every GPU machine), its PIL ones in .venv (the CPU torch, no torchvision); the two differ in what
# their helpers take and return, so the family tests run in both. The lane's venv is about 5.5 GB and
# takes ~12 minutes to build, so it lives outside the clone (shared by every clone and CI run here),
# named by a hash of what it installs: a changed pin makes a new one, and an interrupted build has no
# stamp and starts over.
GPU_LANE_TESTS=(tests/test_geometry.py tests/test_families.py tests/test_trl_qwen.py tests/test_prefix_sharing.py
                tests/test_gen_pairs.py tests/test_common.py)

requirement_files() {  # $1 and every file it includes with -r, depth first
  echo "$1"
  local inc
  for inc in $(sed -n 's/^-r[[:space:]]*//p' "$1"); do requirement_files "$(dirname "$1")/$inc"; done
}

gpu_lane_setup() {  # sets LANE_PY, building the venv on first use
  local key dir
  # the base interpreter is part of the key: a venv only runs with the Python it was made from
  key=$( (python3 --version; for f in $(requirement_files requirements-gpu-lane.txt); do cat "$f"; done) \
        | sha256sum | cut -c1-16)
  dir="${MIA_DPO_CACHE:-$HOME/.cache/mia-dpo}/venv-gpu-lane-$key"
  LANE_PY="$dir/bin/python"
  [ "$(cat "$dir/.complete" 2>/dev/null)" = "$key" ] && return
  mkdir -p "$(dirname "$dir")"
  exec 9>"$dir.lock"; flock 9  # two runs at once: one builds, the other waits and reuses it
  if [ "$(cat "$dir/.complete" 2>/dev/null)" != "$key" ]; then
    echo "building the GPU-user lane's venv in $dir (about 5.5 GB, ~12 minutes; reused afterwards)" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$LANE_PY" -m pip install -q -r requirements-gpu-lane.txt
    "$LANE_PY" -c "import torchvision.transforms.v2.functional" || {  # the lane is void without it
      echo "the GPU-user lane's torchvision does not import in $dir (no stamp: the next run rebuilds)" >&2; exit 1; }
    echo "$key" > "$dir/.complete"
  fi
  exec 9>&-
}

# Every stage's defaults are the toy demo: with no flags a stage reads the toy world and takes
# its `toy` recipe (06: full fine-tune, lr 2e-4, an SFT term on chosen, a replay term on the
# world's single-image rows, 6 epochs of 16 pairs; 05: sequence pairs only; 01-03: a few thousand
# rows), printed at its start. A real checkpoint or data set gets the `paper` recipe instead (each
# stage's RECIPES, README "Paper scale").
case "${1:-}" in
  demo)
    setup requirements.txt
    # The toy pipeline: each stage with no arguments (paths under data/toy, models/, out/).
    rm -f out/demo-times.tsv; mkdir -p out
    stage() {  # stage NAME CMD...: run, and note its wall time for the summary
      local t0=$SECONDS; echo; echo "=== $1"; "${@:2}"; printf '%s\t%s\n' "$1" $((SECONDS - t0)) >> out/demo-times.tsv
    }
    stage "00 toy world" "$PY" 00_make_toy.py
    stage "00 toy base model" "$PY" 00_train_toy.py
    stage "01 sequence" "$PY" 01_make_sequence.py
    stage "02 grid" "$PY" 02_make_grid.py
    stage "03 pic-in-pic" "$PY" 03_make_pip.py
    stage "04 answers + attention selection" "$PY" 04_gen_pairs.py
    stage "05 post-selection" "$PY" 05_post_select.py
    stage "06 DPO" "$PY" 06_train_dpo.py --overwrite  # the demo starts over each time it runs
    stage "07 evaluation (held-out)" env PYTHON="$PY" bash 07_eval.sh
    "$PY" - <<'SUMMARY'
import json
print("\n=== summary: base vs MIA-DPO on the toy world's held-out split (out/eval-heldout/report.txt)")
print(open("out/eval-heldout/report.txt").read())
sel = json.load(open("data/toy/pairs.jsonl.meta.json"))["counts"]["by_format"]
post = json.load(open("data/toy/pairs.post.jsonl.meta.json"))["counts"]
print("selection on the training prompts (04): attention ratio of the target, right vs wrong answers")
print(f"{'format':<10}{'prompts':>8}{'wrong':>7}{'ratio right':>12}{'ratio wrong':>12}{'precision':>10}{'recall':>8}{'pairs 04':>9}")
for f, t in sel.items():
    fr = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{f:<10}{t['prompts']:>8}{t['wrong']:>7}{fr(t['mean_ratio_right']):>12}{fr(t['mean_ratio_wrong']):>12}"
          f"{fr(t['precision']):>10}{fr(t['recall']):>8}{t['pairs']:>9}")
print("pairs per format after 05: " + ", ".join(f"{f} {n}" for f, n in post["table"]["kept"].items()) + f" (total {post['kept']})")
print("\nstage wall times (s):")
times = [line.rstrip("\n").split("\t") for line in open("out/demo-times.tsv")]
for name, s in times:
    print(f"  {name:<36}{s:>6}")
print(f"  {'total':<36}{sum(int(s) for _, s in times):>6}")
SUMMARY
    ;;
  effect)
    setup requirements.txt
    # The ablation behind the README's results: for each seed, a toy world and base (seed 0: the
    # committed one), then the toy recipe on pair sets from the same sequence prompts — attention-
    # selected rejected answers (04 and 05 defaults: the method), every wrong answer (no attention
    # or perplexity selection), a random subset of every wrong answer of the method's size — the
    # method's pairs with the preference term off (sft-only: --dpo-alpha 0), with the SFT and replay
    # terms off (pure-dpo: --gamma 0 --replay none, the paper's loss), with the replay term off
    # (no-replay), and a second round (iterative: 01 -> 04 -> 05 -> 06 on fresh sequence prompts,
    # from the method's model); all scored side by side on dev and
    # held-out.   SEEDS="0 1 2" SPLITS="dev heldout" bash run.sh effect   (the defaults; each step is
    # skipped when its output exists, so seeds can run side by side and be summarised together)
    HERE=$(pwd)
    for S in ${SEEDS:-0 1 2}; do
      R="$HERE/runs/effect-s$S"; T="$R/data/toy"; M="$R/models/toy-llava"
      echo; echo "=== seed $S -> $R"
      "$PY" 00_make_toy.py --root "$R" --seed "$S"
      "$PY" 00_train_toy.py --root "$R" --eval-split dev ${TOY_FLAGS:-}
      seq() {  # seq OUT SEED: 01's sequence prompts from the training split
        [ -f "$1" ] || "$PY" 01_make_sequence.py --data "$T/train.json" --image-root "$T/images" --seed "$2" --out "$1"
      }
      seq "$T/sequence.jsonl" "$S"
      gen=("$PY" 04_gen_pairs.py --data "$T/sequence.jsonl" --image-root "$T/images" --model "$M" --seed "$S")
      [ -f "$T/pairs.jsonl" ] || "${gen[@]}" --out "$T/pairs.jsonl"
      [ -f "$T/pairs-all.jsonl" ] || "${gen[@]}" --out "$T/pairs-all.jsonl" --threshold sequence=inf --min-ppl 0
      "$PY" 05_post_select.py --data "$T/pairs.jsonl" --out "$T/pairs.post.jsonl"
      "$PY" 05_post_select.py --data "$T/pairs-all.jsonl" --out "$T/pairs-all.post.jsonl" --min-ppl 0 --max-ppl inf
      "$PY" 05_post_select.py --data "$T/pairs-all.jsonl" --out "$T/pairs-random.post.jsonl" \
          --min-ppl 0 --max-ppl inf --sample-like "$T/pairs.post.jsonl" --seed "$S"
      dpo() {  # dpo ARM PAIRS MODEL [06 flags]: the toy recipe, skipped when trained
        [ -f "$R/out/$1/final/config.json" ] || "$PY" 06_train_dpo.py --model "$3" --pairs "$T/$2.post.jsonl" \
            --image-root "$T/images" --out "$R/out/$1" --seed "$S" --recipe toy --overwrite "${@:4}" ${DPO_FLAGS:-}
      }
      dpo attention pairs "$M"
      dpo all-wrong pairs-all "$M"
      dpo random pairs-random "$M"
      dpo sft-only pairs "$M" --dpo-alpha 0
      dpo pure-dpo pairs "$M" --gamma 0 --replay none
      dpo no-replay pairs "$M" --replay none
      # iterative: fresh prompts (01 with another seed), the method's model answers them (04 + 05),
      # and a second round of the same recipe starts from it, with it as the reference
      seq "$T/sequence-r2.jsonl" $((S + 1000))
      [ -f "$T/pairs-r2.jsonl" ] || "$PY" 04_gen_pairs.py --data "$T/sequence-r2.jsonl" --image-root "$T/images" \
          --model "$R/out/attention/final" --seed "$S" --out "$T/pairs-r2.jsonl"
      "$PY" 05_post_select.py --data "$T/pairs-r2.jsonl" --out "$T/pairs-r2.post.jsonl" --recipe toy
      dpo iterative pairs-r2 "$R/out/attention/final"
      arms=(base attention all-wrong random sft-only pure-dpo no-replay iterative)
      models=(); for arm in "${arms[@]}"; do
        [ "$arm" = base ] && models+=(--model "base=$M") || models+=(--model "$arm=$R/out/$arm")
      done
      for split in ${SPLITS:-dev heldout}; do
        [ -f "$R/out/eval-$split/report.json" ] || (cd "$R" && PYTHON="$PY" SPLIT=$split OUT="$R/out/eval-$split" \
            bash "$HERE/07_eval.sh" "${models[@]}")
      done
    done
    SEEDS="${SEEDS:-0 1 2}" SPLITS="${SPLITS:-dev heldout}" "$PY" - <<'SUMMARY'
import json, os, statistics
seeds, splits = os.environ["SEEDS"].split(), os.environ["SPLITS"].split()
def seq(r, key="accuracy"):  # sequences 2-5 pooled
    g = [v for k, v in r["groups"].items() if k.startswith("sequence ")]
    return sum(v[key] * v["n"] for v in g) / sum(v["n"] for v in g)
def interference(r):  # element-interference errors over every multi-image group
    return sum(v.get("errors", {}).get("element interference", 0) for k, v in r["groups"].items() if k != "multi-image" and k != "single")
for split in splits:
    reps = {s: json.load(open(f"runs/effect-s{s}/out/eval-{split}/report.json")) for s in seeds}
    arms = list(reps[seeds[0]])
    print(f"\n=== {split}: accuracy (%), mean of seeds {' '.join(seeds)} (per seed: change in sequence, single)")
    print(f"{'arm':<11}{'single':>8}{'sequence':>10}{'multi':>7}{'seq change':>11}{'single chg':>11}{'EI errors':>10}   "
          + "  ".join(f"s{s}: seq/single" for s in seeds))
    base = {s: reps[s][arms[0]] for s in seeds}
    for a in arms:
        r = {s: reps[s][a] for s in seeds}
        m = lambda f: 100 * statistics.mean(f(r[s]) for s in seeds)  # noqa: E731
        single = lambda x: x["groups"]["single"]["accuracy"]  # noqa: E731
        per = "  ".join(f"{100 * (seq(r[s]) - seq(base[s])):+7.1f}/{100 * (single(r[s]) - single(base[s])):+5.1f}" for s in seeds)
        print(f"{a:<11}{m(single):>8.1f}{m(seq):>10.1f}{m(lambda x: x['groups']['multi-image']['accuracy']):>7.1f}"
              f"{m(seq) - 100 * statistics.mean(seq(base[s]) for s in seeds):>+11.1f}"
              f"{m(single) - 100 * statistics.mean(single(base[s]) for s in seeds):>+11.1f}"
              f"{statistics.mean(interference(r[s]) for s in seeds):>10.1f}   {per}")
    print(f"\n=== {split}: where the probability moves, mean of seeds {' '.join(seeds)} (07's mass split and held-out pairs)")
    cols = [("sequence", k) for k in ("truth", "other_images", "no_image", "rejected")] \
        + [("multi-image", k) for k in ("truth", "other_images", "other_attributes", "no_image")]
    heads = ["seq truth", "other img", "no image", "rejected", "multi truth", "other img", "other attr", "no image"]
    print(f"{'arm':<11}" + "".join(f"{h:>12}" for h in heads) + f"{'chosen chg':>12}{'rej chg':>9}{'reward acc':>11}{'pref acc':>9}")
    def mean_cell(values, spec, width, scale=1):  # a mean over seeds, or "-" where a seed lacks it
        return f"{'-' if None in values else format(scale * statistics.mean(values), spec):>{width}}"
    for a in arms:
        row = f"{a:<11}" + "".join(mean_cell([reps[s][a]["mass"][g][k] for s in seeds], ".1f", 12, 100) for g, k in cols)
        p = [reps[s][a]["pairs"]["all"] for s in seeds]
        for k, spec, width, scale in (("chosen_change", "+.2f", 12, 1), ("rejected_change", "+.2f", 9, 1),
                                      ("reward_accuracy", ".1f", 11, 100), ("preference_accuracy", ".1f", 9, 100)):
            row += mean_cell([x.get(k) for x in p], spec, width, scale)
        print(row)
    print("(mass at the first answer token, % of the next-token distribution; seq: sequences 2-5 pooled, one-word "
          "questions; rejected: the base's wrong answer where it was an answer word. Pairs: the base's held-out "
          "mistakes, chosen = truth; chg = mean log-prob change against the base; reward acc = % where the chosen "
          "gained more than the rejected; pref acc = % where the truth has the higher log-prob)")
for s in seeds:
    n = {a: json.load(open(f"runs/effect-s{s}/data/toy/{f}.post.jsonl.meta.json"))["counts"]["kept"]
         for a, f in (("attention", "pairs"), ("all-wrong", "pairs-all"), ("random", "pairs-random"), ("iterative", "pairs-r2"))}
    prior = json.load(open(f"runs/effect-s{s}/models/toy-llava/toy_report.json")).get("text_prior") or {}
    print(f"seed {s}: sequence pairs trained on: " + ", ".join(f"{a} {v}" for a, v in n.items())
          + f"; base's text prior: {prior.get('steps')} steps, learned {prior.get('learned')}")
SUMMARY
    ;;
  test)
    setup requirements-test.txt
    harness_setup
    shift
    "$PY" -m pytest -q tests "$@"
    ;;
  test-gpu-lane)
    gpu_lane_setup
    shift
    "$LANE_PY" -m pytest -q "${GPU_LANE_TESTS[@]}" "$@"
    ;;
  *)
    echo "usage: bash run.sh demo | test [pytest args] | test-gpu-lane [pytest args] | effect" >&2
    exit 2
    ;;
esac
