"""
bench_replay.py — what 06's replay term costs per step on the toy: the toy recipe with and without it.

  bash run.sh demo                                # once: the toy world, its pairs and base in data/ and models/
  python bench/bench_replay.py                    # 3 repeats x 30 steps per contender, alternating
  python bench/bench_replay.py --repeats 5 --steps 40 --threads 2

Contenders: `replay` = 06 with the toy recipe (the replay term on data/toy/train.json, 16 rows per
step beside 16 pairs), `none` = the same with `--replay none`. Each run is its own process on the
demo's pairs (data/toy/pairs.post.jsonl) and base (models/toy-llava), alternating none/replay/...
for --repeats rounds. Per process: the median of the trainer's own per-step `ms` (data loading to
optimizer step) over the steps after the first, and the process's peak resident memory
(ru_maxrss). Reports medians over processes and the ratio replay/none.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


def run_once(name, args, out):
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "06_train_dpo.py"), "--recipe", "toy", "--max-steps", str(args.steps),
           "--threads", str(args.threads), "--out", str(out), *(["--replay", "none"] if name == "none" else [])]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"bench_replay: {name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    peak = float(run.stdout.rsplit("PEAK_MB", 1)[1].split()[0])
    return statistics.median(r["ms"] for r in rows[1:]), peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not (ROOT / "data/toy/pairs.post.jsonl").is_file() or not (ROOT / "models/toy-llava").is_dir():
        raise SystemExit("bench_replay: run `bash run.sh demo` first (it makes the toy pairs and base)")
    got = {"none": [], "replay": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in got:
                ms, peak = run_once(name, args, Path(tmp) / f"{name}-{r}")
                got[name].append((ms, peak))
                print(f"round {r + 1}: {name:<7} step {ms:7.1f} ms  peak RSS {peak:7.1f} MB", flush=True)
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for n, v in got.items()}
    print(f"\n| contender | step (ms) | peak RSS (MB) |\n|---|---|---|")
    for n, (ms, peak) in med.items():
        print(f"| {n} | {ms:.0f} | {peak:.0f} |")
    print(f"\nreplay/none: step time {med['replay'][0] / med['none'][0]:.2f}x, peak RSS {med['replay'][1] / med['none'][1]:.2f}x "
          f"(medians of {args.repeats} processes x {args.steps - 1} timed steps)")


if __name__ == "__main__":
    main()
