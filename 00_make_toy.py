"""
00_make_toy.py — the embedded default: a synthetic single-image QA world and a tiny LLaVA
trained on it from scratch, on the CPU, so that every later stage has data and a model.

out: data/toy/{train,heldout}.json + data/toy/images/<subset>/<id>.png   (LLaVA-665k format)
     models/toy-llava/   (save_pretrained: LlavaForConditionalGeneration + LlavaProcessor)
     models/toy-llava/toy_report.json   (held-out accuracy, timings, settings)
  python 00_make_toy.py                        # a few minutes on 2 CPU cores
  python 00_make_toy.py --tiny --root /tmp/t   # seconds: what the tests run
  python 00_make_toy.py --steps 3000 --model-out models/toy-llava-long   # a longer-trained base

The world: a 64x64 image holds one coloured shape on a coloured background; three visual
styles play the part of LLaVA's sub-datasets (coco, gqa, ...): `plain`, `speckled`, `striped`.
Questions ask the shape's or the background's colour; answers are one word, checked exactly.
A share of prompts already use the multi-image syntax with a single image
(`Image3:<image>\\nIn Image3, what color is the shape?`): the model knows the words but has
never had to pick one image among several — like a real LLaVA trained on single images,
which is what MIA-DPO starts from. Existing outputs are reused unless --force.
"""
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

import common

# ---- the world (edit me) --------------------------------------------------------------------
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 225),
                "yellow": (235, 215, 40), "purple": (140, 60, 185), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128), "brown": (115, 75, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
SUBSETS = ("plain", "speckled", "striped")  # the toy's "sub-datasets"
QUESTIONS = {  # attribute -> phrasings
    "color": ("What color is the shape?", "What is the color of the shape?"),
    "background": ("What color is the background?", "What is the color of the background?"),
}
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "image": "<image>"}
# llava-hf/llava-1.5-7b-hf's chat template, verbatim: the toy model is prompted exactly as the real one.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Words the later stages write into prompts (sequence labels, pic-in-pic phrases): in the
# tokenizer's training text so they become whole tokens; any other word still encodes (bytes).
PROMPT_WORDS = ("In Image1 Image2 Image3 Image4 Image5 Image6 Image7 Image8 Image9 For the image picture photo "
                "plot subplot inset center centre central middle Regarding Looking at Concerning About On "
                "Within inner embedded small smaller overlaid framed main one shown placed USER ASSISTANT")


def draw_scene(seed, size, shape, color, background, subset):
    """Render one scene -> uint8 array (size, size, 3). All randomness from `seed`."""
    r = np.random.default_rng(seed)
    bg = np.array(BACKGROUNDS[background], float) + r.integers(-12, 13, 3)
    img = np.zeros((size, size, 3)) + bg
    yy, xx = np.mgrid[0:size, 0:size]
    if subset == "speckled":  # salt-and-pepper-ish texture on the background
        spots = r.random((size, size)) < 0.15
        img[spots] += r.normal(0, 45, (int(spots.sum()), 1))
    elif subset == "striped":  # darker stripes, horizontal or vertical
        period = int(r.integers(6, 12))
        coord = yy if r.random() < 0.5 else xx
        img[(coord % period) < period // 2] *= 0.75
    s = r.uniform(0.42, 0.62) * size  # shape extent
    cx, cy = r.uniform(s / 2 + 2, size - s / 2 - 2, 2)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= (s / 2) ** 2
    elif shape == "square":
        inside = (abs(dx) <= s / 2) & (abs(dy) <= s / 2)
    elif shape == "triangle":  # apex up
        inside = (dy <= s / 2) & (dy >= -s / 2) & (abs(dx) <= (dy + s / 2) / 2)
    else:  # cross
        inside = ((abs(dx) <= s / 6) & (abs(dy) <= s / 2)) | ((abs(dy) <= s / 6) & (abs(dx) <= s / 2))
    img[inside] = np.array(SHAPE_COLORS[color], float) + r.integers(-18, 19, 3)
    img += r.normal(0, 4, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_row(seed, subset, index, labelled_share):
    """One LLaVA-format sample with 1-2 turns about one scene (the scene kept under `toy`)."""
    rid = f"{subset}-{index:06d}"
    rng = common.row_rng(seed, rid)
    scene = {"shape": rng.choice(SHAPES), "color": rng.choice(list(SHAPE_COLORS)),
             "background": rng.choice(list(BACKGROUNDS))}
    attrs = ["color", "background"]
    rng.shuffle(attrs)
    attrs = attrs[: rng.choice((1, 2))]
    qs = [rng.choice(QUESTIONS[a]) for a in attrs]
    if rng.random() < labelled_share:  # multi-image syntax, one image
        k = rng.randint(1, 5)
        qs = [f"In Image{k}, " + _lower_first(q) for q in qs]
        qs[0] = f"Image{k}:<image>\n" + qs[0]
    elif rng.random() < 0.1:  # LLaVA data also has the image after the text
        qs[0] = qs[0] + "\n<image>"
    else:
        qs[0] = "<image>\n" + qs[0]
    conv = []
    for q, a in zip(qs, attrs):
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": scene[a]}]
    return {"id": rid, "image": f"{subset}/{rid}.png", "conversations": conv, "toy": scene}


def turn_examples(row):
    """Every turn of a row as a stand-alone example {q, a, kind, images, per_image}: a later
    turn is asked the way the first one was (same image marker and label)."""
    conv = row["conversations"]
    first = conv[0]["value"]
    at = first.index("<image>")
    out = []
    for t in range(0, len(conv), 2):
        q = conv[t]["value"]
        if t and first.endswith("<image>"):
            q = q + "\n<image>"
        elif t:
            q = first[: at + len("<image>\n")] + q
        kind = ("labelled " if "Image" in q else "") + ("color" if "shape" in q else "background")
        out.append({"q": q, "a": conv[t + 1]["value"], "kind": kind, "images": [row["image"]], "per_image": None})
    return out


def sequence_examples(seed, rows, n_per_count, counts, tag):
    """Multi-image sequence questions over a split's scenes, in stage 01's prompt format:
    `Image1:<image>\n...ImageN:<image>\nIn ImageK, what color is the shape?` -> scene K's answer.
    Used to measure the multi-image phenomenon, and (with --multi-share) as SFT curriculum."""
    out = []
    for n in counts:
        for i in range(n_per_count):
            rng = common.row_rng(seed, f"{tag}-seq{n}-{i}")
            picked = rng.sample(rows, n)
            k, attr = rng.randint(1, n), rng.choice(list(QUESTIONS))
            q = "".join(f"Image{j}:<image>\n" for j in range(1, n + 1)) + f"In Image{k}, " + _lower_first(rng.choice(QUESTIONS[attr]))
            out.append({"q": q, "a": picked[k - 1]["toy"][attr], "kind": f"sequence {n}",
                        "images": [r["image"] for r in picked], "per_image": [r["toy"][attr] for r in picked]})
    return out


def _lower_first(q):
    return q[0].lower() + q[1:]


def build_tokenizer(texts):
    """Byte-level BPE trained in-process on the world's text (like LLaVA's Llama tokenizer:
    every string encodes, "Image3" is two tokens), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [SPECIAL[k] for k in ("pad", "unk", "bos", "eos", "image")]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_model(tokenizer, a):
    """A tiny LlavaForConditionalGeneration (CLIP-style tower, Llama LM) and its processor."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    vision = CLIPVisionConfig(hidden_size=a.vision_width, intermediate_size=4 * a.vision_width,
                              num_hidden_layers=a.vision_layers, num_attention_heads=4,
                              image_size=a.image_size, patch_size=a.patch, projection_dim=a.vision_width)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=a.width, intermediate_size=4 * a.width,
                       num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=2048, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
                      image_seq_length=(a.image_size // a.patch) ** 2)
    torch.manual_seed(a.seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # subtle: squash to size x size instead of llava-hf's shortest-edge resize + centre crop, so a
    # wide grid collage keeps every cell (04 maps boxes through whichever the processor does).
    ip = CLIPImageProcessorPil(size={"height": a.image_size, "width": a.image_size}, do_center_crop=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=a.patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_TEMPLATE)
    return model, proc


# ---- plumbing ---------------------------------------------------------------------------------
SPLITS = {"train": 0, "dev": 400_000, "heldout": 500_000}  # index offsets: disjoint ids, disjoint scenes


def make_data(a, data_dir):
    """Write images + {train,dev,heldout}.json; return {split: rows}."""
    from PIL import Image

    sizes = {"train": a.n_train, "dev": a.n_dev, "heldout": a.n_heldout}
    out = {}
    for split, offset in SPLITS.items():
        rows = []
        for subset in SUBSETS:
            (data_dir / "images" / subset).mkdir(parents=True, exist_ok=True)
            for i in range(offset, offset + math.ceil(sizes[split] / len(SUBSETS))):
                row = make_row(a.seed, subset, i, a.labelled_share)
                pixels = draw_scene(common.row_rng(a.seed, row["id"]).getrandbits(63), a.image_size,
                                    **row["toy"], subset=subset)
                with common.atomic_write(data_dir / "images" / row["image"], "wb") as f:
                    Image.fromarray(pixels).save(f, format="PNG")
                rows.append(row)
        with common.atomic_write(data_dir / f"{split}.json") as f:
            json.dump(rows, f, indent=0)
        out[split] = rows
    common.write_sidecar(data_dir / "train.json", a, counts={k: len(v) for k, v in out.items()})
    return out


def read_split(data_dir, split):
    return [row for _, row in common.read_rows(data_dir / f"{split}.json")]


def encode_all(proc, examples, image_root, chunk=256):
    """Tokenise every example once: padded tensors the training loop indexes into."""
    import torch

    parts = []
    for i in range(0, len(examples), chunk):
        ex = examples[i : i + chunk]
        ims = [[common.load_image(image_root, p) for p in e["images"]] for e in ex]
        parts.append(common.build_inputs(proc, [e["q"] for e in ex], ims, answers=[e["a"] for e in ex]))
        parts[-1]["pixel_values"] = parts[-1]["pixel_values"].split([len(e["images"]) for e in ex])
    T = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
    return {"input_ids": torch.cat([pad(p["input_ids"], proc.tokenizer.pad_token_id) for p in parts]),
            "attention_mask": torch.cat([pad(p["attention_mask"], 0) for p in parts]),
            "labels": torch.cat([pad(p["labels"], common.IGNORE_INDEX) for p in parts]),
            "pixel_values": [pv for p in parts for pv in p["pixel_values"]]}  # per example: (n_images, 3, H, W)


def train(model, data, a):
    """SFT, loss on answer tokens only: AdamW, linear warm-up, cosine decay."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
    g = torch.Generator().manual_seed(a.seed)
    n, model = data["input_ids"].shape[0], model.train()
    t0, log = time.time(), []
    for step in range(a.steps):
        idx = torch.randint(n, (a.batch_size,), generator=g)
        T = int(data["attention_mask"][idx].sum(1).max())  # trim shared right padding
        batch = {k: data[k][idx, :T] for k in ("input_ids", "attention_mask", "labels")}
        batch["pixel_values"] = torch.cat([data["pixel_values"][i] for i in idx.tolist()])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)})
            print(f"step {step:5d} | loss {loss.item():.4f} | lr {sched.get_last_lr()[0]:.1e} | {time.time() - t0:6.1f} s", flush=True)
    return model.eval(), log


def evaluate(model, proc, examples, image_root, batch_size=64):
    """Greedy exact-match accuracy by kind of question. For multi-image kinds also: the
    accuracy of answering about a random image of the prompt, and the share of wrong answers
    that are true of another image of the prompt (the paper's *sequence confusion*)."""
    res = {}
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size]
        ims = [[common.load_image(image_root, p) for p in e["images"]] for e in ex]
        for e, ans in zip(ex, common.generate(model, proc, [e["q"] for e in ex], ims, max_new_tokens=4)):
            r = res.setdefault(e["kind"], {"n": 0, "right": 0, "random_image": 0.0, "wrong": 0, "confused": 0})
            r["n"] += 1
            ok = ans.strip().lower() == e["a"]
            r["right"] += ok
            if e["per_image"]:
                r["random_image"] += e["per_image"].count(e["a"]) / len(e["per_image"])
                r["wrong"] += not ok
                r["confused"] += (not ok) and ans.strip().lower() in e["per_image"]
    out = {}
    for kind, r in sorted(res.items()):
        out[kind] = {"accuracy": r["right"] / r["n"], "n": r["n"]}
        if r["wrong"] or r["random_image"]:
            out[kind]["random_image_accuracy"] = r["random_image"] / r["n"]
            out[kind]["sequence_confusion_share_of_errors"] = r["confused"] / max(r["wrong"], 1)
    return out


def main(a):
    import torch

    t_start = time.time()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    data_dir, model_dir = Path(a.data_out), Path(a.model_out)
    image_root = data_dir / "images"
    if a.force or not all((data_dir / f"{s}.json").is_file() for s in SPLITS):
        t = time.time()
        rows = make_data(a, data_dir)
        print(f"data: {', '.join(f'{len(v)} {k}' for k, v in rows.items())} samples -> {data_dir} ({time.time() - t:.1f} s)")
    else:
        rows = {s: read_split(data_dir, s) for s in SPLITS}
        print(f"data: reusing {data_dir} ({', '.join(f'{len(v)} {k}' for k, v in rows.items())} samples; --force rebuilds)")
    counts = range(2, a.max_images + 1)
    train_ex = [e for r in rows["train"] for e in turn_examples(r)]
    if a.multi_share > 0:  # curriculum: a share of SFT examples are multi-image sequences
        n_multi = round(len(train_ex) * a.multi_share / (1 - a.multi_share))
        train_ex += sequence_examples(a.seed, rows["train"], max(1, n_multi // len(counts)), counts, "train")
    eval_ex = [e for r in rows["heldout"] for e in turn_examples(r)]
    eval_ex += sequence_examples(a.seed, rows["heldout"], a.n_eval_sequences, counts, "heldout")
    report_path = model_dir / "toy_report.json"
    if not a.force and (model_dir / "config.json").is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        print(f"model: reusing {model_dir} (--force rebuilds)")
    else:
        texts = [e["q"] + " " + e["a"] for e in train_ex] + [PROMPT_WORDS] * 20
        model, proc = build_model(build_tokenizer(texts), a)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: tiny LLaVA, {n_params / 1e6:.2f}M parameters, {(a.image_size // a.patch) ** 2} tokens/image; "
              f"{len(train_ex)} training examples")
        t = time.time()
        data = encode_all(proc, train_ex, image_root)
        t_enc, t = time.time() - t, time.time()
        model, log = train(model, data, a)
        t_train, t = time.time() - t, time.time()
        acc = evaluate(model, proc, eval_ex, image_root)
        single = [v for k, v in acc.items() if not k.startswith("sequence")]
        acc["single-image"] = {"accuracy": sum(v["accuracy"] * v["n"] for v in single) / sum(v["n"] for v in single),
                               "n": sum(v["n"] for v in single)}
        report = {"heldout": acc, "parameters": n_params, "train_log": log,
                  "seconds": {"encode": round(t_enc, 1), "train": round(t_train, 1), "eval": round(time.time() - t, 1)},
                  "settings": {k: v for k, v in vars(a).items() if k not in ("force",)}}
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        (tmp / "toy_report.json").write_text(json.dumps(report, indent=1))
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)  # the model directory appears whole or not at all
    acc = report["heldout"]
    print("held-out accuracy (greedy, exact match):")
    for kind, r in acc.items():
        extra = ""
        if "random_image_accuracy" in r:
            extra = (f"  (answering about a random image of the prompt: {r['random_image_accuracy']:.3f}; "
                     f"errors true of another image: {r['sequence_confusion_share_of_errors']:.0%})")
        print(f"  {kind:22s} {r['accuracy']:.3f} on {r['n']}{extra}")
    print(f"00_make_toy: done in {time.time() - t_start:.0f} s -> {data_dir}, {model_dir}")
    return report


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("output")
    g.add_argument("--root", default=".", help="prefix for the two default output directories")
    g.add_argument("--data-out", default=None, help="data directory (default ROOT/data/toy)")
    g.add_argument("--model-out", default=None, help="model directory (default ROOT/models/toy-llava)")
    g.add_argument("--force", action="store_true", help="rebuild data and model even if they exist")
    g = p.add_argument_group("world")
    g.add_argument("--n-train", type=int, default=6000, help="single-image training samples")
    g.add_argument("--n-dev", type=int, default=600, help="dev samples, for tuning later stages (disjoint scenes)")
    g.add_argument("--n-heldout", type=int, default=600, help="held-out samples, for final numbers only (disjoint scenes)")
    g.add_argument("--n-eval-sequences", type=int, default=100, help="held-out multi-image sequences per image count, evaluated at the end")
    g.add_argument("--max-images", type=int, default=5, help="largest image count of sequences (evaluated, and trained with --multi-share)")
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--labelled-share", type=float, default=0.25, help="share of prompts written `ImageK:<image>\\nIn ImageK, ...`")
    g.add_argument("--multi-share", type=float, default=0.0,
                   help="curriculum: share of SFT examples that are 2..max-images sequences (0: single images only, like LLaVA)")
    g = p.add_argument_group("model")
    g.add_argument("--patch", type=int, default=8, help="vision patch size: (image-size/patch)^2 tokens per image")
    g.add_argument("--vision-width", type=int, default=64)
    g.add_argument("--vision-layers", type=int, default=2)
    g.add_argument("--width", type=int, default=128, help="language model hidden size")
    g.add_argument("--layers", type=int, default=4, help="language model layers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=600)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=30)
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--tiny", action="store_true", help="a seconds-long build for tests (few samples and steps)")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_train, a.n_dev, a.n_heldout, a.n_eval_sequences = 90, 15, 30, 5
        a.steps, a.width, a.layers, a.warmup = 20, 64, 2, 5
    a.data_out = a.data_out or str(Path(a.root) / "data" / "toy")
    a.model_out = a.model_out or str(Path(a.root) / "models" / "toy-llava")
    return a


if __name__ == "__main__":
    main(get_args())
