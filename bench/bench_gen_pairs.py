"""
bench_gen_pairs.py — 04's per-batch work (both --probe modes) against plain greedy generation.

  python bench/bench_gen_pairs.py                        # both settings: toy, then Qwen2.5-VL geometry
  python bench/bench_gen_pairs.py --setting toy --rows 200 --repeats 3

Settings (the toy world must exist: 00_make_toy.py, 00_train_toy.py, 01_make_sequence.py):
  toy        models/toy-llava on data/toy/sequence.jsonl: 4 visual tokens per image, short answers.
  qwen2_5_vl a tiny random-weight Qwen2.5-VL (tests/tiny_families.py, built here offline into
             bench/out/) with realistic geometry: the processor's min = max pixels give every image
             --image-tokens merged visual tokens (256: a 448x448 view), so the toy's 2-5 image rows
             are 0.5k-1.3k-token prompts. A random model never stops and its tokens rarely
             re-tokenise as generated, so its generation config (used by every contender alike)
             suppresses all tokens but the digits and <|im_end|> (Qwen splits digits: "3","7" is
             what "37" tokenises to) and ends answers after ~--answer-tokens tokens
             (exponential_decay_length_penalty); those are logits processors, the scored raw logits
             are the model's. Its ratios all sit near 1/n, so thresholds are set per image count to
             the --pair-share quantile of the warm-up round's ratios (the paper's sequence yield ~24%).
Same rows, same fixed batches (04's make_batches), same weights, in one process:
  generate          : load the batch's images, vlm.generate (plain SDPA model, no probe installed);
  04 teacher-forced : 04's run_batch (images, noise, generate, teacher-forced probe forward,
                      selection, reference log-probs of the pairs);
  04 during-gen     : run_batch with --probe during-generation (probe rows and answer log-probs
                      taken while generating, the pairs' chosen scored from the prompt's KV cache).
Each round runs every batch through the three contenders back to back, so a busy spell on the
shared machine hits each; the order turns from batch to batch and round to round. A contender's
round time is the sum over batches (wall and process CPU time). --control adds plain generate a
second time as a fourth contender: its ratio to the first shows what this method calls x1.00. Reported: medians over rounds and the ratios 04/generate. One untimed round
first: on CPU the first forward of each new input shape ran ~10x slower than later ones.
"""
import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build_qwen(out, image_tokens, answer_tokens):
    """The tiny Qwen2.5-VL of tests/tiny_families.py, with every image at `image_tokens` merged
    tokens and answers of digits ending after ~`answer_tokens` tokens (see the module docstring)."""
    import tiny_families

    tiny_families.build("qwen2_5_vl", out)
    cfg = json.loads((out / "processor_config.json").read_text())
    pixels = image_tokens * 28 * 28  # one merged token = 2x2 patches of 14 px
    cfg["image_processor"]["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
    (out / "processor_config.json").write_text(json.dumps(cfg, indent=2))
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    keep = {vocab[str(d)] for d in range(10)} | {added["<|im_end|>"]}
    gen = json.loads((out / "generation_config.json").read_text())
    vocab_size = json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]
    gen["suppress_tokens"] = [i for i in range(vocab_size) if i not in keep]
    gen["exponential_decay_length_penalty"] = [answer_tokens - 4, 1.5]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def quantile_thresholds(recs, share, gp):
    """Per image count, the `share` quantile of the candidates' ratios (strict < for grid/pip: nudged up)."""
    by_n = {}
    for r in recs:
        by_n.setdefault(r["candidate"]["n_images"], []).append(r["candidate"]["ratio"])
    table = {f: dict(v) for f, v in gp.THRESHOLDS.items()}
    table["sequence"] = {n: float(np.quantile(v, share)) for n, v in by_n.items()}
    return table


def breakdown(run, batches, parts):
    """CPU seconds of one round of `run` over the batches, and of each (module, function) in `parts`
    within it (nested parts are counted in each: generate_scored holds model.generate)."""
    spent, saved = dict.fromkeys((f for _, f in parts), 0.0), []
    for mod, f in parts:
        real = getattr(mod, f)

        @functools.wraps(real)
        def timed(*args, _real=real, _f=f, **kw):
            c0 = time.process_time()
            try:
                return _real(*args, **kw)
            finally:
                spent[_f] += time.process_time() - c0
        saved.append((mod, f, real)), setattr(mod, f, timed)
    try:
        c0 = time.process_time()
        for b in batches:
            run(b)
        return time.process_time() - c0, spent
    finally:
        for mod, f, real in saved:
            setattr(mod, f, real)


def run_setting(name, a, gp, common, vlm):
    if name == "toy":
        model = ROOT / "models/toy-llava"
    else:
        model = build_qwen(ROOT / "bench/out/qwen2_5_vl-geometry", a.image_tokens, a.answer_tokens)
    plain, processor = vlm.load_model(model)
    probed, _ = vlm.load_model(model)
    gp.install_probe(probed)
    layer = gp.default_layer(probed)
    argv = ["--data", str(a.data), "--image-root", str(a.image_root), "--model", str(model), "--limit", str(a.rows),
            "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens)]
    modes = {m: gp.get_args(argv + ["--probe", m]) for m in ("teacher-forced", "during-generation")}
    items = gp.load_items(modes["teacher-forced"])
    batches = [[items[i] for i in b] for b in gp.make_batches(items, a.batch_size)]
    ref_model = {"path": str(model), "fingerprint": vlm.model_fingerprint(probed), "image_settings": None}
    boxes = {}  # visual tokens per row (04's token_boxes: each image's count first)
    n_visual = [sum(gp.token_boxes(processor, [common.load_image(a.image_root, p) for p in it["image"]], boxes)[0])
                for it in items]
    counts = Counter()
    # one context per mode for the whole run, as 04's main keeps one (its token-geometry cache is filled once)
    ctx = {m: {"layer": layer, "boxes": {}, "thresholds": gp.THRESHOLDS, "ref_model": ref_model, "viz_ids": set(),
               "probe_rows": counts, "processor": processor} for m in modes}

    def generate(batch):
        ims = [[common.load_image(a.image_root, x) for x in it["image"]] for it in batch]
        vlm.generate(plain, processor, [it["prompt"] for it in batch], ims, a.max_new_tokens, return_finished=True)

    contenders = {"generate": generate,
                  "04 teacher-forced": lambda b: gp.run_batch(probed, processor, b, modes["teacher-forced"],
                                                              ctx["teacher-forced"])[0],
                  "04 during-gen": lambda b: gp.run_batch(probed, processor, b, modes["during-generation"],
                                                          ctx["during-generation"])[0]}
    if a.control:
        contenders["generate (control)"] = generate
    names = list(contenders)
    warm = []
    for b in batches:  # warm-up: a whole untimed round (the first call of a new shape was ~10x slower here)
        for n in names:
            warm.append((n, contenders[n](b)))
    if name != "toy":
        thresholds = quantile_thresholds([r for n, recs in warm if n == "04 during-gen" for r in recs], a.pair_share, gp)
        for c in ctx.values():
            c["thresholds"] = thresholds
    recs = [r for b in batches for r in contenders["04 during-gen"](b)]
    counts.clear()
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(a.repeats):
        w, c = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for i, b in enumerate(batches):
            k = (r + i) % len(names)  # who meets a batch first turns with the batch and the round
            for n in names[k:] + names[:k]:
                t0, c0 = time.perf_counter(), time.process_time()
                contenders[n](b)
                w[n] += time.perf_counter() - t0
                c[n] += time.process_time() - c0
        for n in names:
            wall[n].append(w[n]), cpu[n].append(c[n])
        print(f"{name} round {r + 1}: " + " | ".join(f"{n} {w[n]:.2f} s wall {c[n]:.2f} s CPU" for n in names), flush=True)
    med = statistics.median
    cands = [r["candidate"] for r in recs]
    print(f"== {name}: {len(items)} rows, {len(batches)} batches of <= {a.batch_size}, {a.repeats} rounds, torch threads "
          f"{__import__('torch').get_num_threads()}, load {os.getloadavg()[0]:.1f}; visual tokens per row "
          f"{min(n_visual)}-{max(n_visual)}; answer tokens median {med([c['n_tokens'] for c in cands]):.0f}; "
          f"pairs {sum(c['selected'] for c in cands)} ({sum(c['selected'] for c in cands) / len(cands):.0%}); "
          f"during-generation rows per round: {dict((k, v // a.repeats) for k, v in counts.items())}")
    for n in names:
        print(f"{name} | {n:<18} median wall {med(wall[n]):7.2f} s   CPU {med(cpu[n]):7.2f} s")
    for n in names[1:]:
        ratios = [x / y for x, y in zip(wall[n], wall["generate"])]
        print(f"{name} | {n}: {'04' if n.startswith('04') else 'control'}/generate: x{med(wall[n]) / med(wall['generate']):.2f} wall (per-round ratios median "
              f"x{med(ratios):.2f}), x{med(cpu[n]) / med(cpu['generate']):.2f} CPU", flush=True)
    if a.breakdown:  # where 04 during-gen's time goes, one more round (CPU s; plain generate = _greedy + load_image)
        total, spent = breakdown(contenders["04 during-gen"], batches, [
            (vlm, "generate_scored"), (vlm, "_greedy"), (common, "load_image"), (vlm, "response_ids"),
            (vlm, "score_after_prompt"), (gp, "probe_forward"), (vlm, "image_positions"), (gp, "row_numbers")])
        print(f"{name} | 04 during-gen, one round: {total:.3f} CPU s = " + ", ".join(f"{k} {v:.3f}" for k, v in spent.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--setting", nargs="+", default=["toy", "qwen2_5_vl"], choices=["toy", "qwen2_5_vl"])
    p.add_argument("--data", type=Path, default=ROOT / "data/toy/sequence.jsonl")
    p.add_argument("--image-root", type=Path, default=ROOT / "data/toy/images")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine; 0: auto)")
    p.add_argument("--image-tokens", type=int, default=256, help="qwen2_5_vl: merged visual tokens per image")
    p.add_argument("--answer-tokens", type=int, default=12, help="qwen2_5_vl: about this many tokens per answer")
    p.add_argument("--pair-share", type=float, default=0.24, help="qwen2_5_vl: share of rows made pairs")
    p.add_argument("--breakdown", action="store_true", help="one more round of 04 during-gen, timing its parts")
    p.add_argument("--control", action="store_true", help="plain generate twice: the method's own x1.00")
    a = p.parse_args()
    import common
    import vlm

    if not a.data.exists() or ("toy" in a.setting and not (ROOT / "models/toy-llava").exists()):
        sys.exit("bench_gen_pairs: build the toy first: python 00_make_toy.py && python 00_train_toy.py && "
                 "python 01_make_sequence.py")
    gp = importlib.import_module("04_gen_pairs")
    common.set_threads(a.threads)
    for name in a.setting:
        run_setting(name, a, gp, common, vlm)


if __name__ == "__main__":
    main()
