"""
gpu_check_fast_path.py — 06's fast path on one GPU at Qwen2.5-VL-3B's geometry: does it give the
plain path's numbers, and how fast is it against TRL's DPOTrainer? A prepared check of ~5 minutes.

  python bench/gpu_check_fast_path.py                # one GPU, bf16, 4 images per prompt (budget 420 s)
  python bench/gpu_check_fast_path.py --images 5     # 3-5 images: longer prompts, the fast path's case
  python bench/gpu_check_fast_path.py --tiny         # CPU, fp32, tiny widths: checks the script itself

Needs requirements-test.txt (trl, datasets) beside the project's requirements; nothing is
downloaded: the model is random weights at Qwen/Qwen2.5-VL-3B-Instruct's config.json geometry
(text 2048 wide x 36 layers, 16 query / 2 KV heads, MLP 11008, vocab 151936, M-RoPE sections
[16, 24, 24]; vision tower depth 32, width 1280, MLP 3420, patch 14, 2x2 merge, 112-px windows, full
attention in blocks 7/15/23/31), with tests/tiny_families.py's Qwen2.5-VL tokenizer, processor and
chat template; 448-px images -> 256 visual tokens each.

Phases, each timed; a phase that would start past --budget-s is skipped and said so:
  1. build   the model folder (random init on the device, saved in --dtype) and the pairs
  2. parity  06's plain path against its fast path (prefix-shared rows with re-laid M-RoPE
             positions, images encoded once) on one batch: max |diff| of the summed log-probs and
             of the LoRA gradients (absolute and relative to the largest gradient), in --dtype and,
             unless --no-fp32-parity, in float32 (where they should agree to ~1e-4); and 06's own
             first-batch self-check
  3. speed   three fresh processes, one each: 06 plain, 06 fast (its default) and TRL, the same
             pairs, LoRA r 8 on every language-model linear layer, reference = adapters disabled,
             no activation checkpointing, 1 warm-up + --steps timed steps; median step time ->
             pairs/s, and the peak GPU memory (torch.cuda.max_memory_allocated; CPU: ru_maxrss)
             in all and above the weights
The last line is one JSON object with every number (also written to --out if given).
"""
import argparse
import json
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
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6)
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31])


def device_and_dtype(a):
    import torch

    if a.tiny:
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_fast_path: no GPU here; --tiny runs the script on the CPU")
    return "cuda", {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]


def peak_gb(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---- 1. the model and the pairs -------------------------------------------------------------------
def build(a, folder):
    """Random Qwen2.5-VL at the 3B geometry (--tiny: 64 wide x 2 layers, the tiny tower) -> its weights in GB."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    import bench_dpo_step
    from tiny_families import build as build_tiny

    device, dtype = device_and_dtype(a)
    build_tiny("qwen2_5_vl", folder)  # tokenizer, processor, chat template (and a tiny model, replaced below)
    cfg = AutoConfig.from_pretrained(folder)
    t, v = cfg.text_config, cfg.vision_config
    if a.tiny:
        t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = 64, 256, 2, 4, 2
        v.out_hidden_size = 64
        t.rope_parameters["mrope_section"] = [2, 3, 3]  # head dim 16 -> 8 rotary frequencies
    else:
        for k, x in QWEN25_VL_3B_TEXT.items():
            setattr(t, k, x)
        for k, x in QWEN25_VL_3B_VISION.items():
            setattr(v, k, x)
        t.rope_parameters["mrope_section"] = [16, 24, 24]
        cfg.tie_word_embeddings = t.tie_word_embeddings = True
    t.layer_types = ["full_attention"] * t.num_hidden_layers
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.save_pretrained(folder)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    del model
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["image_processor"]["size"]["longest_edge"] = 448 * 448  # max_pixels: 256 merged tokens per 448-px image
    (folder / "processor_config.json").write_text(json.dumps(pc, indent=2))
    bench_dpo_step.make_pairs(folder / "data", a.batch_size * (a.steps + 1), a.images, size=448)
    return weights


# ---- 2. fast path == plain path ----------------------------------------------------------------------
def parity(a, folder, dtype_name):
    """One batch, plain vs fast: max |diff| of log-probs and LoRA gradients, and 06's self-check."""
    import importlib

    import torch

    import common
    import prefix_sharing
    import train_state
    import vlm

    dpo = importlib.import_module("06_train_dpo")
    device, _ = device_and_dtype(a)
    model, proc = vlm.load_model(folder, dtype=dtype_name, device=device)
    torch.manual_seed(0)
    policy, _ = train_state.prepare_policy(model, "adapters-disabled", lora_r=8, lora_alpha=16)
    for name, p in policy.named_parameters():  # LoRA B starts at 0: make policy != reference
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    rows = [r for _, r in common.read_rows(folder / "data" / "pairs.jsonl")][: a.batch_size]
    pairs = [{"id": r["id"], "images": r["image"], "prompt": r["prompt"], "chosen": r["chosen"],
              "rejected": r["rejected"]} for r in rows]
    plain = dpo.collate(pairs, folder / "data", proc, model)
    why = prefix_sharing.fast_path_blocker(model, plain)
    if why:
        return {"dtype": dtype_name, "fast_path": False, "why": why}

    def logps_and_grads(batch):
        policy.zero_grad(set_to_none=True)
        pc, pr, _, _ = dpo.score(model, batch)
        (pc.sum() - pr.sum()).backward()
        return torch.cat([pc, pr]).detach().float(), {k: p.grad.float().clone() for k, p in policy.named_parameters()
                                                      if p.grad is not None}

    lp_a, g_a = logps_and_grads(plain)
    lp_b, g_b = logps_and_grads(prefix_sharing.lay_out(model, plain))
    scale = max(float(g.abs().max()) for g in g_a.values())
    grad_diff = max(float((g_b[k] - g_a[k]).abs().max()) for k in g_a)
    scorer, _ = train_state.make_scorers(model, None, dpo.score, fsdp=False, world=1)
    try:
        check = {"self_check_max_diff": prefix_sharing.self_check(scorer, model, plain), "self_check": "passed"}
    except SystemExit as e:
        check = {"self_check": f"stopped: {e}"}
    out = {"dtype": dtype_name, "fast_path": True, "tokens_per_plain_row": int(plain["input_ids"].shape[1]),
           "logps_max_abs_diff": float((lp_b - lp_a).abs().max()), "logps": lp_a.tolist(),
           "grad_max_abs_diff": grad_diff, "grad_max_abs": scale, "grad_max_rel_diff": grad_diff / scale, **check}
    del model, policy
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- 3. the contenders, one process each -------------------------------------------------------------
def worker_ours(a, extra):
    import importlib

    import common

    device, _ = device_and_dtype(a)
    dpo = importlib.import_module("06_train_dpo")
    out = Path(a.data).parent / f"ours-{time.time_ns()}"
    dpo.main(dpo.get_args(["--pairs", str(Path(a.data) / "pairs.jsonl"), "--image-root", a.data, "--model", a.model,
                           "--out", str(out), "--recipe", "paper", "--dtype", a.dtype_name, "--no-grad-ckpt",
                           "--grad-accum", "1", "--no-merge", "--lora-r", "8", "--lora-alpha", "16",
                           "--batch-size", str(a.batch_size), "--max-steps", str(a.steps + 1), "--warmup-steps", "0",
                           "--lr", "1e-4", "--save-every", "0", "--threads", "1" if a.tiny else "4", "--max-length", "32768",
                           *extra]))
    ms = [r["ms"] for _, r in common.read_rows(out / "log.jsonl")][1:]
    shutil.rmtree(out, ignore_errors=True)
    return ms, peak_gb(device)


def worker_trl(a):
    import importlib

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import common
    import train_state
    import vlm

    device, _ = device_and_dtype(a)
    torch.set_num_threads(1 if a.tiny else 4)
    model, proc = vlm.load_model(a.model, dtype=a.dtype_name, device=device)  # the loader 06 uses
    decoder = train_state.model_parts(model)[0]  # LoRA on the same layers as 06 (train_state.prepare_policy)
    targets = [f"{decoder}.{n}" for n, m in model.get_submodule(decoder).named_modules() if isinstance(m, torch.nn.Linear)]
    rows = [r for _, r in common.read_rows(Path(a.data) / "pairs.jsonl")]
    exported = importlib.import_module("05_post_select").to_trl(rows, proc, a.data)  # exactly our tokens
    ds = datasets.Dataset.from_list([{**{k: e[k] for k in ("prompt", "chosen", "rejected")},
                                      "images": [common.load_image(a.data, p) for p in r["image"]]}
                                     for e, r in zip(exported, rows)])
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    cfg = DPOConfig(output_dir=str(Path(a.data).parent / f"trl-{time.time_ns()}"), per_device_train_batch_size=a.batch_size,
                    max_steps=a.steps + 1, learning_rate=1e-4, warmup_steps=0, max_grad_norm=1.0, beta=0.1,
                    max_length=None, use_cpu=device == "cpu", bf16=a.dtype_name == "bfloat16",
                    fp16=a.dtype_name == "float16", gradient_checkpointing=False, optim="adamw_torch",
                    remove_unused_columns=False, report_to="none", logging_steps=10_000, save_strategy="no", seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=proc, callbacks=[Clock()],
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    trainer.train()
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return [1000 * (t1 - t0) for t0, t1 in zip(ends, ends[1:])], peak_gb(device)


WORKERS = {"plain": lambda a: worker_ours(a, ["--no-prefix-sharing", "--no-encode-images-once"]),
           "fast": lambda a: worker_ours(a, []),  # 06's default: prefix sharing + images encoded once
           "trl": worker_trl}


def run_worker(name, a, folder, timeout):
    cmd = [sys.executable, __file__, "--worker", name, "--model", str(folder), "--data", str(folder / "data"),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--dtype", a.dtype] + (["--tiny"] if a.tiny else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(30, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"ran past the budget ({max(30, timeout):.0f} s left when it started)"}
    if res.returncode != 0:
        return {"error": (res.stdout[-1500:] + res.stderr[-1500:]).strip()}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(a):
    import torch

    a.dtype_name = "float32" if a.tiny else a.dtype
    if a.worker:
        ms, peak = WORKERS[a.worker](a)
        print(json.dumps({"ms": ms, "peak_gb": peak}))
        return
    t0, report = time.time(), {"setting": {"tiny": a.tiny, "dtype": a.dtype_name, "images": a.images,
                                           "pairs_per_step": a.batch_size, "timed_steps": a.steps}}
    device, _ = device_and_dtype(a)
    report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    left = lambda: a.budget_s - (time.time() - t0)  # noqa: E731
    folder = Path(a.tmp or tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        report["weights_gb"] = build(a, folder)
        report["build_s"] = round(time.time() - t0, 1)
        print(f"built in {report['build_s']} s: {report['weights_gb']:.2f} GB of weights ({report['device']})", flush=True)
        report["parity"] = []
        for dt in [a.dtype_name] + (["float32"] if not a.tiny and a.fp32_parity and a.dtype_name != "float32" else []):
            if left() < 60:
                report["parity"].append({"dtype": dt, "skipped": "budget"})
                continue
            t1 = time.time()
            report["parity"].append({**parity(a, folder, dt), "s": round(time.time() - t1, 1)})
            print("parity", json.dumps(report["parity"][-1]), flush=True)
        runs = {}
        for name in ("plain", "fast", "trl"):
            if left() < 45:
                runs[name] = {"skipped": "budget"}
                continue
            t1 = time.time()
            runs[name] = run_worker(name, a, folder, left())
            runs[name]["s"] = round(time.time() - t1, 1)
            if "ms" in runs[name] and runs[name]["ms"]:
                step = statistics.median(runs[name]["ms"])
                runs[name].update(step_ms=step, pairs_per_s=a.batch_size / step * 1000,
                                  peak_above_weights_gb=runs[name]["peak_gb"] - (0 if a.tiny else report["weights_gb"]))
            print(name, json.dumps({k: v for k, v in runs[name].items() if k != "ms"}), flush=True)
        report["speed"] = runs
        ok = {k: v for k, v in runs.items() if "pairs_per_s" in v}
        for x, y in (("fast", "trl"), ("fast", "plain"), ("plain", "trl")):
            if x in ok and y in ok:
                report[f"{x}/{y}"] = {"pairs_per_s": ok[x]["pairs_per_s"] / ok[y]["pairs_per_s"],
                                      "peak_memory": ok[x]["peak_gb"] / ok[y]["peak_gb"],
                                      "peak_above_weights": ok[x]["peak_above_weights_gb"] / ok[y]["peak_above_weights_gb"]}
                print(f"{x}/{y}: pairs/s x{report[f'{x}/{y}']['pairs_per_s']:.2f}, peak memory "
                      f"x{report[f'{x}/{y}']['peak_memory']:.2f} (above the weights x{report[f'{x}/{y}']['peak_above_weights']:.2f})")
    finally:
        if not a.tmp:
            shutil.rmtree(folder, ignore_errors=True)
    report["total_s"] = round(time.time() - t0, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, fp32, a tiny model: check the script without a GPU")
    p.add_argument("--images", type=int, default=4, help="images per prompt (256 visual tokens each)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender (after one warm-up step)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="GPU weights dtype")
    p.add_argument("--fp32-parity", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare plain and fast in float32 (GPU; ~15 GB at this geometry)")
    p.add_argument("--budget-s", type=float, default=420, help="skip phases that would start after this many seconds")
    p.add_argument("--out", default=None, help="also write the report JSON here")
    p.add_argument("--tmp", default=None, help="work folder (kept); default a temporary one, removed")
    p.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
