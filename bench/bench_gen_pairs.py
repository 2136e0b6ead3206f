"""
bench_gen_pairs.py — 04's per-batch work (both --probe modes) against plain greedy generation.

  python bench/bench_gen_pairs.py                       # toy: 96 sequence rows, batches of 16, 5 rounds
  python bench/bench_gen_pairs.py --rows 200 --repeats 3 --data data/toy/sequence.jsonl

Same rows, same fixed batches (04's make_batches), same model weights, in one process:
  generate          : load the batch's images, vlm.generate (plain SDPA model, no probe installed);
  04 teacher-forced : 04's run_batch (images, noise, generate, teacher-forced probe forward,
                      selection, reference log-probs of the pairs);
  04 during-gen     : run_batch with --probe during-generation (probe and answer log-probs taken
                      while generating; teacher-forced fallback rows and the pairs' chosen forward).
Each round runs every batch through the three contenders, in an order rotated per round so a busy
spell on the shared machine hits each; a contender's round time is the sum over batches (wall and
process CPU time). Reported: medians over rounds and the ratios 04/generate. One untimed round
first: on CPU the first forward of each new input shape ran ~10x slower than later ones.
"""
import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data", default=str(ROOT / "data/toy/sequence.jsonl"))
    p.add_argument("--image-root", default=str(ROOT / "data/toy/images"))
    p.add_argument("--model", default=str(ROOT / "models/toy-llava"))
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    import common
    import vlm

    gp = importlib.import_module("04_gen_pairs")
    common.set_threads(0)
    plain, processor = vlm.load_model(a.model)
    probed, _ = vlm.load_model(a.model)
    gp.install_probe(probed)
    layer = gp.default_layer(probed)
    argv = ["--data", a.data, "--image-root", a.image_root, "--model", a.model, "--limit", str(a.rows),
            "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens)]
    modes = {m: gp.get_args(argv + ["--probe", m]) for m in ("teacher-forced", "during-generation")}
    items = gp.load_items(modes["teacher-forced"])
    batches = [[items[i] for i in b] for b in gp.make_batches(items, a.batch_size)]
    ref_model = {"path": a.model, "fingerprint": vlm.model_fingerprint(probed), "image_settings": None}
    ctx = lambda: {"layer": layer, "boxes": {}, "thresholds": gp.THRESHOLDS, "ref_model": ref_model,  # noqa: E731
                   "viz_ids": set()}

    def generate(batch):
        ims = [[common.load_image(a.image_root, x) for x in it["image"]] for it in batch]
        vlm.generate(plain, processor, [it["prompt"] for it in batch], ims, a.max_new_tokens, return_finished=True)

    contenders = {"generate": generate,
                  "04 teacher-forced": lambda b: gp.run_batch(probed, processor, b, modes["teacher-forced"], ctx()),
                  "04 during-gen": lambda b: gp.run_batch(probed, processor, b, modes["during-generation"], ctx())}
    names = list(contenders)
    for b in batches:  # warm-up: a whole untimed round (the first call of a new shape was ~10x slower here)
        for n in names:
            contenders[n](b)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(a.repeats):
        order = names[r % 3:] + names[:r % 3]
        w, c = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for b in batches:
            for n in order:
                t0, c0 = time.perf_counter(), time.process_time()
                contenders[n](b)
                w[n] += time.perf_counter() - t0
                c[n] += time.process_time() - c0
        for n in names:
            wall[n].append(w[n]), cpu[n].append(c[n])
        print(f"round {r + 1}: " + " | ".join(f"{n} {w[n]:.2f} s wall {c[n]:.2f} s CPU" for n in names), flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"{len(items)} rows, {len(batches)} batches of <= {a.batch_size}, {a.repeats} rounds, "
          f"torch threads {__import__('torch').get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    for n in names:
        print(f"{n:<18} median wall {med(wall[n]):7.2f} s   CPU {med(cpu[n]):7.2f} s")
    for n in names[1:]:
        ratios = [x / y for x, y in zip(wall[n], wall["generate"])]
        print(f"{n}: 04/generate: x{med(wall[n]) / med(wall['generate']):.2f} wall (per-round ratios median "
              f"x{med(ratios):.2f}), x{med(cpu[n]) / med(cpu['generate']):.2f} CPU")


if __name__ == "__main__":
    main()
