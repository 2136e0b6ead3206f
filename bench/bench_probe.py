"""
bench_probe.py — 04's attention probe against the authors' approach, same model, same answers.

  python bench/bench_probe.py                          # 2-5 images, 3 rounds, 32 answer tokens
  python bench/bench_probe.py --images 2 5 --repeats 5 --new-tokens 64 --heads 16
  python bench/bench_probe.py --family qwen2_5_vl --images 3   # Qwen2.5-VL: 448 px -> 256 tokens

Model: a randomly initialised LlavaForConditionalGeneration with LLaVA-1.5's token geometry —
336 px images, patch 14 -> 576 visual tokens per image (CLS dropped), interleaved with text —
and a tiny width so it runs on a CPU: --layers text layers (default 8), --heads heads of dim 8.
Prompt: `Image{k}:` + 576 image tokens per image, a 20-token question, 5 template tokens.
--family qwen2_5_vl: a random Qwen2_5_VLForConditionalGeneration of the same text size (M-RoPE,
its real processor and template from tests/tiny_families.py), 448x448 images -> 32x32 patches ->
256 tokens after the 2x2 merge (vlm.cap_image_tokens 256), `Image{k}:` labels, the toy question.
Both contenders answer greedily with exactly --new-tokens tokens, then measure the per-image
attention of the response rows at the middle layer, heads averaged:
  authors : generate(output_attentions=True, return_dict_in_generate=True) with eager attention,
            every layer's attention of every step kept, then layer L's rows reduced;
  probe   : 04's path — plain generate, then one teacher-forced forward over prompt + answer
            with 04's registered attention function (SDPA + softmax of the response rows at
            layer L only) and the response log-probs (04 gets PPL from the same forward).
Every measurement is a fresh subprocess: build the model (same seed), warm up on a 1-image
prompt, time one run (wall and CPU time: on a shared, busy machine CPU time is the steadier
measure of work). Memory: peak RSS (getrusage maxrss) of the process, and the peak above the
warmed-up process (the contender's own working memory; the fixed ~400 MB of Python, torch and
transformers is in both). --repeats rounds, each running every (image count, contender) in turn,
so a busy spell on the machine hits both. Reported: medians, ratios authors/probe, and the
largest difference of the per-image attention between the two (same rows, same layer).
"""
import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ID, BOS, VOCAB = 999, 1, 1000


def build_model(layers, heads, seed=0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=16 * heads, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=8192,
                       bos_token_id=BOS, eos_token_id=2, pad_token_id=0, initializer_range=0.2)  # peaked attention
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    return LlavaForConditionalGeneration(cfg).eval()


def make_prompt(n_images, seed=0):
    """-> input_ids (1, T), pixel_values (n, 3, 336, 336), image spans [(start, end)]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(3, IMAGE_ID, (k,), generator=g).tolist()  # noqa: E731
    ids, spans = [BOS] + text(2), []
    for _ in range(n_images):
        ids += text(4)
        spans.append((len(ids), len(ids) + 576))
        ids += [IMAGE_ID] * 576
    ids += text(25)
    return torch.tensor([ids]), torch.randn(n_images, 3, 336, 336, generator=g), spans


def run_authors(model, ids, pv, spans, layer, new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_attentions=True,
                             return_dict_in_generate=True, pad_token_id=0)
    T = ids.shape[1]
    rows = [step[layer][0, :, -1, :T].mean(0) for step in out.attentions]  # (T,) per generated token
    mean = torch.stack(rows).mean(0)
    return out.sequences[0, T:].tolist(), [float(mean[s:e].sum()) for s, e in spans]


def run_probe(model, ids, pv, spans, layer, new_tokens, gp):
    import torch

    import common

    import vlm

    import token_geometry

    with torch.no_grad():
        seq = model.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    T = ids.shape[1]
    labels = torch.full_like(seq, vlm.IGNORE_INDEX)
    labels[:, T:] = seq[:, T:]
    batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "pixel_values": pv, "labels": labels}
    with torch.no_grad(), gp.probing(layer, [(T - 1, seq.shape[1] - 1)]) as probe:
        vlm.response_logps(model, batch)
        attn = probe["out"][0]
    return seq[0, T:].tolist(), [float(attn[s:e].sum()) for s, e in spans]


def build_qwen(layers, heads, seed=0):
    """A random Qwen2.5-VL with the text size of build_model, its real processor capped at 256
    visual tokens per image (448x448 px)."""
    import tempfile

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    import common
    import vlm
    import token_geometry
    from tiny_families import build

    d = build("qwen2_5_vl", Path(tempfile.mkdtemp()) / "qwen")
    cfg = AutoConfig.from_pretrained(d)
    t = cfg.text_config
    t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = layers, heads, heads
    t.hidden_size, t.intermediate_size, t.initializer_range = 8 * heads, 16 * heads, 0.2  # head dim 8, peaked
    t.layer_types = ["full_attention"] * layers
    cfg.vision_config.out_hidden_size = t.hidden_size  # the merger projects into the text width
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None  # answers of exactly --new-tokens tokens
    proc = vlm.load_processor(d)
    vlm.cap_image_tokens(proc, 256)
    return model, proc


def qwen_prompt(proc, n_images, seed=0):
    """-> the processor's batch for n 448x448 noise images (+ `positions` of each image's tokens)."""
    import numpy as np
    from PIL import Image

    import common

    import vlm

    import token_geometry

    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)) for _ in range(n_images)]
    q = "".join(f"Image{k}:<image>\n" for k in range(1, n_images + 1)) + "In Image1, what color is the shape?"
    batch = vlm.build_inputs(proc, [q], [ims])
    counts = [len(b) for b in token_geometry.image_token_boxes(proc, ims)]
    positions = vlm.image_positions(batch["input_ids"], proc.tokenizer.convert_tokens_to_ids("<|image_pad|>"), [counts])[0]
    return batch, positions


def run_qwen(model, batch, positions, layer, new_tokens, gp=None):
    """authors (gp None) or probe on a Qwen batch -> (answer tokens, per-image attention mass)."""
    import torch

    import common

    import vlm

    import token_geometry

    T = batch["input_ids"].shape[1]
    gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        if gp is None:
            out = model.generate(**batch, **gen, output_attentions=True, return_dict_in_generate=True)
            mean = torch.stack([step[layer][0, :, -1, :T].mean(0) for step in out.attentions]).mean(0)
            return out.sequences[0, T:].tolist(), [float(mean[p].sum()) for p in positions]
        seq = model.generate(**batch, **gen)
        full = {**batch, "input_ids": seq, "attention_mask": torch.ones_like(seq),
                "mm_token_type_ids": torch.nn.functional.pad(batch["mm_token_type_ids"], (0, seq.shape[1] - T)),
                "labels": torch.cat([torch.full((1, T), vlm.IGNORE_INDEX), seq[:, T:]], dim=1)}
        with gp.probing(layer, [(T - 1, seq.shape[1] - 1)]) as probe:
            vlm.response_logps(model, full)
            attn = probe["out"][0]
    return seq[0, T:].tolist(), [float(attn[p].sum()) for p in positions]


def worker(a):
    """One subprocess: one contender, one image count -> JSON on stdout."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(a.threads)
    layer = a.layers // 2
    gp = importlib.import_module("04_gen_pairs")
    if a.family == "qwen2_5_vl":
        model, proc = build_qwen(a.layers, a.heads)
        if a.worker == "authors":
            model.set_attn_implementation("eager")
        else:
            gp.install_probe(model)
        probe = None if a.worker == "authors" else gp
        run = lambda b, pos: run_qwen(model, b, pos, layer, a.new_tokens, probe)  # noqa: E731
        prompt = lambda n, seed=0: qwen_prompt(proc, n, seed)  # noqa: E731
    else:
        model = build_model(a.layers, a.heads)
        if a.worker == "authors":
            model.set_attn_implementation("eager")
            run = lambda i, p, s: run_authors(model, i, p, s, layer, a.new_tokens)  # noqa: E731
        else:
            gp.install_probe(model)
            run = lambda i, p, s: run_probe(model, i, p, s, layer, a.new_tokens, gp)  # noqa: E731
        prompt = make_prompt
    run(*prompt(1, seed=1))  # warm-up: lazy initialisation out of the measurement
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args = prompt(a.worker_images)
    ids = args[0]["input_ids"] if a.family == "qwen2_5_vl" else args[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    tokens, masses = run(*args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_mb": peak, "above_mb": peak - base, "tokens": tokens,
                      "masses": masses, "seq_len": ids.shape[1]}))


def main(a):
    runs = {}  # (images, contender) -> list of results, one per round
    for r in range(a.repeats):  # rounds interleave the contenders, so a busy spell hits both
        for n in a.images:
            for who in ("authors", "probe"):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", who, "--worker-images", str(n)]
                run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if run.returncode:
                    sys.exit(f"{who} with {n} images failed:\n{run.stderr[-3000:]}")
                runs.setdefault((n, who), []).append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {n} images done", file=sys.stderr)
    med = lambda n, who, k: statistics.median(x[k] for x in runs[(n, who)])  # noqa: E731
    print(f"`python bench/bench_probe.py {' '.join(sys.argv[1:])}` — {a.family}, {a.layers} text layers x {a.heads} heads, probe "
          f"layer {a.layers // 2}, {a.new_tokens} answer tokens, medians of {a.repeats} rounds, {a.threads} threads\n")
    print("| images | seq len | wall s authors / probe | speed-up wall | CPU s authors / probe | speed-up CPU | "
          "peak RSS MB authors / probe | ratio | peak above warmed-up process MB authors / probe | ratio | "
          "max diff per-image attention | same answers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in a.images:
        au, pr = runs[(n, "authors")], runs[(n, "probe")]
        diff = max(abs(x - y) for ra, rp in zip(au, pr) for x, y in zip(ra["masses"], rp["masses"]))
        same = all(ra["tokens"] == rp["tokens"] for ra, rp in zip(au, pr))
        m = {(who, k): med(n, who, k) for who in ("authors", "probe") for k in ("wall", "cpu", "peak_mb", "above_mb")}
        print(f"| {n} | {au[0]['seq_len']} | {m['authors', 'wall']:.2f} / {m['probe', 'wall']:.2f} | "
              f"{m['authors', 'wall'] / m['probe', 'wall']:.1f}x | {m['authors', 'cpu']:.2f} / {m['probe', 'cpu']:.2f} | "
              f"{m['authors', 'cpu'] / m['probe', 'cpu']:.1f}x | {m['authors', 'peak_mb']:.0f} / {m['probe', 'peak_mb']:.0f} | "
              f"{m['authors', 'peak_mb'] / m['probe', 'peak_mb']:.1f}x | {m['authors', 'above_mb']:.0f} / "
              f"{m['probe', 'above_mb']:.0f} | {m['authors', 'above_mb'] / max(m['probe', 'above_mb'], 1):.0f}x | "
              f"{diff:.1e} | {'yes' if same else 'NO'} |")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("benchmark")
    g.add_argument("--family", choices=("llava", "qwen2_5_vl"), default="llava", help="the token geometry (see above)")
    g.add_argument("--images", type=int, nargs="+", default=[2, 3, 4, 5])
    g.add_argument("--repeats", type=int, default=3, help="rounds; each runs every contender once per image count")
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--worker", choices=("authors", "probe"), help=argparse.SUPPRESS)
    g.add_argument("--worker-images", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = get_args()
    worker(args) if args.worker else main(args)
