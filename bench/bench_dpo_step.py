"""
bench_dpo_step.py — one DPO training step of 06_train_dpo.py against TRL's DPOTrainer.

  pip install -r requirements-test.txt           # TRL (the peer), as for the parity test
  python bench/bench_dpo_step.py                  # 3 repeats x (1 warm-up + 4 timed steps) per contender
  python bench/bench_dpo_step.py --repeats 5 --steps 6 --batch-size 2 --images 3
  python bench/bench_dpo_step.py --contenders ours,fast --images 5   # a subset
  python bench/bench_dpo_step.py --family qwen2_5_vl --contenders ours,fast,trl   # Qwen2.5-VL, 448 px -> 256 tokens
  python bench/bench_dpo_step.py --family qwen3_vl --contenders ours,fast,trl     # Qwen3-VL, 512 px -> 256 tokens
  python bench/bench_dpo_step.py --family gemma3 --contenders ours,fast,trl       # Gemma 3, 256 tokens per image
  python bench/bench_dpo_step.py --family qwen3_5 --contenders ours,fast,trl      # Qwen3.5, 512 px -> 256 tokens (plain only)

Contenders: `ours` = 06_train_dpo.py's plain path (chosen and rejected rows each carry the prompt),
`shared` = --prefix-sharing (one [prompt | chosen | rejected] row per pair, block mask), `fast` =
--prefix-sharing --encode-images-once (image features computed once per step, no grad, reused by
policy and reference), `trl` = TRL's DPOTrainer.

The model: a tiny-width LLaVA (CLIP-style tower, Llama LM, the toy tokenizer and llava-1.5's chat
template) with LLaVA-1.5's token geometry: 336 px images, patch 14 -> 576 visual tokens per
image, --images per prompt, answers of ~10-40 tokens. Built in a temporary folder, random weights.
All contenders train the same LoRA (r 8 on every language-model linear layer), fp32, no
activation checkpointing, reference = adapters disabled, on the same pairs, --batch-size pairs
per step (chosen + rejected = 2x rows), AdamW, clipping.
--family qwen2_5_vl / qwen3_vl / gemma3 / qwen3_5: a random model of that family with the same text
size (vision tower, processor and chat template from tests/tiny_families.py), 256 visual tokens per
image (build_family says how); 06's fast path re-lays M-RoPE positions (Qwen) and the
sliding-window / image-block masks (Gemma 3) for the prefix-shared rows. Qwen3.5 has no fast path
(prefix_sharing.fast_path_blocker: its Gated-DeltaNet layers carry a recurrent state through every
earlier token), so `shared` / `fast` run 06's plain path there, and say so (the `note` lines).

Each contender runs in its own fresh process (so peak memory is its own), alternating
ours/trl/ours/trl... for --repeats rounds. Per process: the time of each step after the first
(ours: the trainer's own per-step `ms`, data loading to optimizer step; TRL: the interval between
consecutive `on_step_end` callbacks, which likewise spans data loading to optimizer step), and
ru_maxrss, the process's peak resident memory, minus the resident memory after imports (torch,
transformers, peft and, for TRL, trl/datasets/accelerate), i.e. the model, data and step.
Reports medians over processes (each process's median step) and the ratios ours/TRL, shared/ours,
fast/ours and fast/TRL.
"""
import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
BACKGROUNDS = ["white", "black", "gray", "brown"]


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- the setting: model + pairs ---------------------------------------------------------------
def build_model(out, toy_model, width, layers):
    """Tiny LLaVA with LLaVA-1.5 geometry (336 px, patch 14, 576 tokens/image) -> saved at `out`."""
    import torch
    from transformers import (AutoProcessor, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = AutoProcessor.from_pretrained(toy_model, local_files_only=True)
    template, tok = tok.chat_template, tok.tokenizer
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"height": 336, "width": 336}, do_center_crop=False),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    model.save_pretrained(out)
    proc.save_pretrained(out)


# the other geometries: tests/tiny_families.py's checkpoint (vision tower, processor, chat template),
# the text model widened to the bench's size, random weights, images sized to 256 visual tokens each
GEOMETRY = {  # family -> (image side in px, visual tokens per image)
    "llava": (336, 576), "qwen2_5_vl": (448, 256), "qwen3_vl": (512, 256), "gemma3": (448, 256),
    "qwen3_5": (512, 256)}


def build_family(family, out, width, layers):
    """Random `family` model of `width` x `layers` (4 heads), 256 visual tokens per image -> saved at `out`.
    qwen2_5_vl: patch 14, 2x2 merge, 448 px; qwen3_vl: patch 16, 2x2 merge, 512 px (DeepStack into
    LM layer 0); both M-RoPE, full attention. gemma3: SigLIP-style tower on 64 px / patch 4 -> 16x16
    patches -> 256 tokens (the release: 896 px / 14 -> 64x64 pooled 4x4 -> 256), 3 sliding-window
    layers per global one (the release: 5) with a 512-token window, so the window cuts into a
    3-image row (~850 tokens; the release's is 1024), and bidirectional attention inside images.
    qwen3_5: Qwen3-VL's tower (patch 16, 2x2 merge, 512 px, no DeepStack), the release's hybrid LM:
    3 Gated-DeltaNet (linear attention) layers per gated full-attention one (full_attention_interval
    4), Gated DeltaNet sized like the release's ratios to the width (key heads half the value heads,
    value heads x head dim = width, head dims = the attention head dim), partial rotary 0.25 with
    interleaved M-RoPE over the remaining frequencies (the release: [11, 11, 10] of 32)."""
    import torch
    import transformers
    from transformers import AutoConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_families import build

    build(family, out)
    cfg = AutoConfig.from_pretrained(out)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = width, 4 * width, layers
    t.num_attention_heads = t.num_key_value_heads = 4
    if getattr(t, "head_dim", None):
        t.head_dim = width // 4
    pc = json.loads((out / "processor_config.json").read_text())
    side, tokens = GEOMETRY[family]
    if family == "qwen3_5":
        t.layer_types = [("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(layers)]
        t.linear_num_value_heads, t.linear_num_key_heads = 4, 2  # the release's 2:1 (32:16 at 4096)
        t.linear_key_head_dim = t.linear_value_head_dim = width // 4  # value heads x dim = width
        f = int(t.head_dim * t.rope_parameters["partial_rotary_factor"]) // 2  # rotary frequencies per head
        t.rope_parameters["mrope_section"] = [len(range(i, f, 3)) for i in range(3)]  # interleaved t, h, w
    if family.startswith("qwen"):
        if family != "qwen3_5":
            t.layer_types = ["full_attention"] * layers
            h = width // 8  # rotary frequencies per head, split over (t, h, w) like the release's [16, 24, 24] of 64
            t.rope_parameters["mrope_section"] = [h // 4, (h - h // 4) // 2, h - h // 4 - (h - h // 4) // 2]
        cfg.vision_config.out_hidden_size = width  # the merger projects into the text width
        pc["image_processor"]["size"]["longest_edge"] = side * side  # max_pixels: 256 merged tokens
    else:  # gemma3
        t.query_pre_attn_scalar = width // 4
        t.sliding_window = 512
        t.layer_types = [("full_attention" if (i + 1) % 4 == 0 else "sliding_attention") for i in range(layers)]
        cfg.vision_config.image_size, cfg.mm_tokens_per_image = 64, tokens
        pc["image_processor"]["size"] = {"height": 64, "width": 64}
        pc["image_seq_length"] = tokens
    torch.manual_seed(0)
    model = getattr(transformers, cfg.architectures[0])._from_config(cfg, attn_implementation="sdpa")
    model.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(pc, indent=2))


def make_pairs(folder, n, n_images, seed=0, size=336):
    """n pairs of n_images `size`-px scenes; answers are sentences of ~10-40 tokens."""
    from PIL import Image, ImageDraw

    rng, rows = random.Random(seed), []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        paths, colors = [], []
        for j in range(n_images):
            im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            x, y, s = rng.randrange(40, 180), rng.randrange(40, 180), rng.randrange(60, 140)
            ImageDraw.Draw(im).ellipse((x, y, x + s, y + s), fill=tuple(rng.randrange(256) for _ in range(3)))
            paths.append(f"images/{i}-{j}.png")
            im.save(folder / paths[-1])
            colors.append(rng.choice(COLORS))
        t = rng.randrange(n_images)
        labels = "".join(f"Image{j + 1}:<image>\n" for j in range(n_images))
        bg = rng.choice(BACKGROUNDS)
        chosen = f"The shape in Image{t + 1} is {colors[t]}, drawn on a {bg} background." + " It is alone." * rng.randrange(3)
        rejected = f"It is {rng.choice(COLORS)}." + " The background looks plain and the shape is round." * rng.randrange(1, 3)
        rows.append({"id": f"b{i}", "image": paths, "prompt": f"{labels}In Image{t + 1}, describe the shape.",
                     "chosen": chosen, "rejected": rejected,
                     "mia": {"format": "sequence", "n_images": n_images, "target": t + 1}})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- the contenders (each in its own process) -------------------------------------------------
def add_ref_logps(data, model_dir):
    """data/pairs_ref.jsonl: the pairs plus the reference log-probs 04 would store (same model,
    plain path, its fingerprint), so the `stored` contender runs no reference forward at all."""
    import torch

    import common

    import vlm

    model, proc = vlm.load_model(model_dir, dtype="float32")
    fp, out = vlm.model_fingerprint(model), []
    for _, r in common.read_rows(data / "pairs.jsonl"):
        ims = [common.load_image(data, p) for p in r["image"]]
        batch = vlm.build_inputs(proc, [r["prompt"]] * 2, [ims, ims], answers=[r["chosen"], r["rejected"]])
        with torch.no_grad():
            sums = vlm.response_logps(model, batch)[0]
        out.append({**r, "ref_chosen_logps": float(sums[0]), "ref_rejected_logps": float(sums[1]),
                    "ref_model": {"path": str(model_dir), "fingerprint": fp}})
    common.write_jsonl(data / "pairs_ref.jsonl", out)


def worker_ours(a, extra=(), pairs="pairs.jsonl"):
    import importlib

    import torch  # noqa: F401  (imports before the baseline, like the TRL worker)
    import transformers  # noqa: F401
    import peft  # noqa: F401

    base = rss_mb()
    dpo = importlib.import_module("06_train_dpo")
    out = Path(a.data) / f"ours-{time.time_ns()}"
    dpo.main(dpo.get_args(["--pairs", str(Path(a.data) / pairs), "--image-root", a.data, "--model", a.model,
                           "--out", str(out), "--recipe", "paper", "--dtype", "float32", "--no-grad-ckpt",
                           "--grad-accum", "1", "--no-merge", "--lora-r", "8", "--lora-alpha", "16", "--batch-size", str(a.batch_size),
                           "--max-steps", str(a.steps + 1), "--warmup-steps", "0", "--lr", "1e-4", "--save-every", "0",
                           "--threads", str(a.threads), "--max-length", "8192", *extra]))
    ms = [r["ms"] for _, r in __import__("common").read_rows(out / "log.jsonl")][1:]
    shutil.rmtree(out, ignore_errors=True)
    return ms, base


def worker_trl(a):
    import torch
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import common
    import train_state
    import vlm

    base = rss_mb()
    torch.set_num_threads(a.threads)
    import importlib

    model_tmp, proc = vlm.load_model(a.model)
    decoder = train_state.model_parts(model_tmp)[0]  # LoRA on the same layers as 06 (train_state.prepare_policy)
    lm = model_tmp.get_submodule(decoder)
    targets = [f"{decoder}.{n}" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    del model_tmp, lm
    rows = [r for _, r in common.read_rows(Path(a.data) / "pairs.jsonl")]
    exported = importlib.import_module("05_post_select").to_trl(rows, proc, a.data)  # exactly our tokens (parity tests)

    def example(e, r):
        return {**{k: e[k] for k in ("prompt", "chosen", "rejected")}, "images": [common.load_image(a.data, p) for p in r["image"]]}

    ds = datasets.Dataset.from_list([example(e, r) for e, r in zip(exported, rows)])
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    cfg = DPOConfig(output_dir=str(Path(a.data) / f"trl-{time.time_ns()}"), per_device_train_batch_size=a.batch_size,
                    max_steps=a.steps + 1, learning_rate=1e-4, warmup_steps=0, max_grad_norm=1.0, beta=0.1,
                    max_length=None, use_cpu=True, bf16=False, gradient_checkpointing=False, optim="adamw_torch",
                    remove_unused_columns=False, report_to="none", logging_steps=10_000, save_strategy="no",
                    seed=0, dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    trainer = DPOTrainer(model=a.model, args=cfg, train_dataset=ds, processing_class=proc, peft_config=peft_cfg,
                         callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return [1000 * (t1 - t0) for t0, t1 in zip(ends, ends[1:])], base


# the fast path: prefix sharing alone, and with the images encoded once per step
FAST = {"shared": ["--prefix-sharing", "--no-encode-images-once"],
        "fast": ["--prefix-sharing", "--encode-images-once"]}
WORKERS = {"ours": lambda a: worker_ours(a, ["--no-prefix-sharing", "--no-encode-images-once"]),
           "shared": lambda a: worker_ours(a, FAST["shared"]),
           "fast": lambda a: worker_ours(a, FAST["fast"]),
           # + the reference log-probs stored in the pairs (as 04 writes them): no reference forward
           "stored": lambda a: worker_ours(a, FAST["fast"] + ["--ref-logps", "stored"], pairs="pairs_ref.jsonl"),
           "trl": worker_trl}


def run_worker(name, a, data, model):
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--model", str(model),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    lines = res.stdout.strip().splitlines()
    # 06's line on which path it took (fast path, or the plain path and why)
    return {**json.loads(lines[-1]), "notes": [x for x in lines if x.startswith("06_train_dpo: ") and " path" in x]}


def main(a):
    if a.worker:
        ms, base = WORKERS[a.worker](a)
        print(json.dumps({"ms": ms, "base_mb": base, "peak_mb": peak_mb()}))
        return
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        side, tokens = GEOMETRY[a.family]
        if a.family == "llava":
            build_model(tmp / "model", ROOT / a.toy_model, a.width, a.layers)
        else:
            build_family(a.family, tmp / "model", a.width, a.layers)
        n_pairs = a.batch_size * (a.steps + 1)  # one epoch = the run: no pair is seen twice
        make_pairs(tmp / "data", n_pairs, a.images, size=side)
        if "stored" in a.contenders.split(","):
            add_ref_logps(tmp / "data", tmp / "model")
        names = a.contenders.split(",")
        if not names or set(names) - set(WORKERS):
            raise SystemExit(f"--contenders: choose from {sorted(WORKERS)}")
        results = {name: [] for name in names}
        for r in range(a.repeats):
            for name in names:
                res = run_worker(name, a, tmp / "data", tmp / "model")
                results[name].append(res)
                if r == 0:
                    for note in res["notes"]:
                        print(f"note {name}: {note}", flush=True)
                print(f"repeat {r + 1} {name:6s}: step {statistics.median(res['ms']):7.0f} ms (median of {len(res['ms'])}), "
                      f"peak RSS {res['peak_mb']:6.0f} MB, over imports {res['peak_mb'] - res['base_mb']:6.0f} MB", flush=True)
        summary = {}
        for name, rs in results.items():
            step = statistics.median(statistics.median(x["ms"]) for x in rs)
            summary[name] = {"step_ms": step, "pairs_per_s": a.batch_size / step * 1000,
                             "peak_mb": statistics.median(x["peak_mb"] for x in rs),
                             "step_mb": statistics.median(x["peak_mb"] - x["base_mb"] for x in rs)}
        print(f"\n{a.family}: {a.images} images x {tokens} tokens, {a.batch_size} pairs/step, width {a.width}, {a.layers} layers, "
              f"{a.repeats} repeats x {a.steps} timed steps")
        print("| contender | step (ms) | pairs/s | peak RSS (MB) | peak over imports (MB) |\n|---|---|---|---|---|")
        for name, s in summary.items():
            print(f"| {name} | {s['step_ms']:.0f} | {s['pairs_per_s']:.2f} | {s['peak_mb']:.0f} | {s['step_mb']:.0f} |")
        for x, y in (("ours", "trl"), ("shared", "ours"), ("fast", "ours"), ("fast", "trl")):
            if x in summary and y in summary:
                o, t = summary[x], summary[y]
                print(f"{x}/{y}: pairs/s x{o['pairs_per_s'] / t['pairs_per_s']:.2f}, peak over imports "
                      f"x{o['step_mb'] / t['step_mb']:.2f}, peak RSS x{o['peak_mb'] / t['peak_mb']:.2f}")
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("setting")
    g.add_argument("--family", choices=sorted(GEOMETRY), default="llava", help="the token geometry (see above)")
    g.add_argument("--images", type=int, default=3, help="images per prompt (576 tokens each; the others: 256)")
    g.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    g.add_argument("--width", type=int, default=128, help="language model hidden size")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--toy-model", default="models/toy-llava", help="where the tokenizer and chat template come from")
    g = p.add_argument_group("measurement")
    g.add_argument("--contenders", default="ours,shared,fast,stored,trl",
                   help="comma list: ours (plain path), shared (--prefix-sharing), fast (--prefix-sharing "
                        "--encode-images-once), stored (fast + reference log-probs stored in the pairs), trl")
    g.add_argument("--repeats", type=int, default=3, help="fresh processes per contender")
    g.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: on the shared 2-core machine, faster and steadier than 2)")
    g.add_argument("--tmp", default=None, help="work folder (kept); default a temporary one, removed")
    g = p.add_argument_group("internal")
    g.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    g.add_argument("--data", default=None, help=argparse.SUPPRESS)
    g.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
