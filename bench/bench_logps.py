"""
bench_logps.py — response log-probs: vlm.response_logps (LM head only at response
positions) vs the usual full-vocabulary logits over every position, forward + backward.

Model: tiny width, but LLaVA-1.5's token geometry and vocabulary (336 px, patch 14 -> 576
visual tokens per image, Llama vocabulary 32064), 3 images per prompt, 24-token answers.
Each measurement runs in a fresh subprocess so that peak RSS belongs to one contender.
  python bench/bench_logps.py                 # ~1-2 minutes on 2 CPU cores
  python bench/bench_logps.py --repeats 7 --batch 8
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(batch, n_images, answer_len, vocab):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    # one prompt: text, then per image "ImageK:" + 576 visual tokens, then the question; answer after
    prompt = [1] + sum(([100 + k, 200] + [vocab - 1] * 576 for k in range(n_images)), []) + list(range(300, 320))
    answer = list(range(400, 400 + answer_len)) + [2]
    ids = torch.tensor([prompt + answer] * batch)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                   "pixel_values": torch.randn(batch * n_images, 3, 336, 336)}


def one(mode, a):
    """Run one contender once in this process; print a JSON line."""
    import torch

    import common

    import vlm

    torch.set_num_threads(a.threads)
    model, batch = build(a.batch, a.images, a.answer_len, a.vocab)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "head_only":
        logps = vlm.response_logps(model, batch)[0]
    else:  # full logits over all T positions, then pick the labelled ones
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
        labels = batch["labels"][:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logps = (lp * (labels != -100)).sum(-1)
    logps.sum().backward()
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "s": secs, "peak_mb": peak / 1024, "step_mb": (peak - base_rss) / 1024,
                      "T": batch["input_ids"].shape[1], "logps": logps.tolist()}))


def main(a):
    modes = ("full_logits", "head_only")
    res = {m: [] for m in modes}
    for r in range(a.repeats):
        for m in modes if r % 2 == 0 else modes[::-1]:  # alternate order against drift
            out = subprocess.run([sys.executable, __file__, "--one", m, *sys.argv[1:]], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            res[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    diff = max(abs(x - y) for x, y in zip(res["full_logits"][0]["logps"], res["head_only"][0]["logps"]))
    T = res["head_only"][0]["T"]
    print(f"batch {a.batch} x {T} tokens ({a.images} images x 576 + text), answers {a.answer_len}+EOS, vocab {a.vocab}, "
          f"{a.threads} threads, {a.repeats} repeats, forward+backward; max |logp difference| {diff:.1e}")
    print("| method | median s | median peak RSS MB | median step MB (peak - after build) |")
    print("|---|---|---|---|")
    med = {m: {k: statistics.median(x[k] for x in res[m]) for k in ("s", "peak_mb", "step_mb")} for m in modes}
    for m in modes:
        print(f"| {m} | {med[m]['s']:.3f} | {med[m]['peak_mb']:.0f} | {med[m]['step_mb']:.0f} |")
    print(f"ratio full/head-only: time {med['full_logits']['s'] / med['head_only']['s']:.2f}x, "
          f"step memory {med['full_logits']['step_mb'] / max(med['head_only']['step_mb'], 1):.1f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--answer-len", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one", choices=("full_logits", "head_only"), help=argparse.SUPPRESS)
    a = p.parse_args()
    one(a.one, a) if a.one else main(a)
