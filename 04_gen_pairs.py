"""
04_gen_pairs.py — stage 4: multi-image rows -> the model's own answers -> attention-aware DPO pairs.
in : JSONL of 01-03 + image root + local model     out: pairs JSONL + candidates JSONL (+ .meta.json sidecars)

  python 04_gen_pairs.py                      # toy: data/toy/{sequence,grid,pip}.jsonl -> data/toy/pairs.jsonl
  python 04_gen_pairs.py --data seq.jsonl grid.jsonl pip.jsonl --image-root /data/llava \
      --model /models/llava-1.5-7b-hf --out data/pairs.jsonl --dtype bfloat16 --device cuda --batch-size 16
  python 04_gen_pairs.py ... --shard 0 --num-shards 4    # -> data/pairs-00-of-04.jsonl (05 merges shards)

Per row (first human/gpt turn only): the model answers greedily, with the prompt training builds
(vlm.build_inputs), on images corrupted as the authors did (grid: Gaussian noise std 225 on
the target cell; pic-in-pic: std 49 on the whole image; sequence: none; in float, clipped).
While it generates, a probe measures, at ONE decoder layer (default the middle one), the
heads-averaged attention of the response rows — the query positions that produced the answer's
tokens and EOS: each generation step's newest query row, over the KV cache — to every visual
token. A registered attention function runs the model's attention (SDPA by default) as usual and
computes softmax only for that row at that layer; all-layer `output_attentions` is never kept. Ratio:
  sequence   mean attention on the target image / sum over images of their mean attention
  grid       attention on the target cell / attention on the whole collage
  pic-in-pic attention on the inset / attention on the whole image
Cells and inset are pixel boxes (02/03); token_geometry.image_token_boxes gives, for every visual token,
the box of ORIGINAL pixels it sees through the processor's views (resize, pad, crop, tiles, global
view, merges, pooling), and a token counts with the share of its box inside the cell or inset.
(The authors cut the map into equal blocks and a fixed 16x16 centre, which ignores label strips,
gaps, the inset's real size, what a centre crop removes and every dynamic-resolution layout.)
A model that reads the images through cross-attention layers (Llama 3.2 Vision: one <|image|> per image
in the text) is probed at its middle CROSS-attention layer: the response rows' softmax over its keys,
the visual features of every image's real tiles (CLS + patches; token_geometry.image_key_boxes), under
the cross-attention mask it gets. subtle: Mllama's processor lets a token see only the last image before
it (or the run of images right before it), so with interleaved `ImageK:<image>` labels the answer sees
the last image alone: a sequence row's ratio is 1 when that image is the target, else 0.
--viz N draws the maps (the paper's Fig. 2).
The answer's log-probs (PPL) are generation's raw logits; the pairs' chosen references of rows
answered from the clean images are scored from generation's KV cache of the prompt
(vlm.score_after_prompt), their rejected references are the answer's own log-probs. A row whose
generated tokens are not the tokens scored (render_pair's response + stop token: e.g. "r","o"
where " ro" is scored with a leading space token, or no stop token at --max-new-tokens) takes a
teacher-forced forward over prompt + answer instead. --probe teacher-forced takes every row so
(a second prefill per row: x1.9-2.5 the cost of generating, BENCHMARKS.md); both agree to 1e-5 (tests).
A row becomes a pair (chosen = ground truth, rejected = answer) when the normalised answer
differs, both are non-empty, the answer was not cut by --max-new-tokens, PPL > 1.1 (PPL of the
answer + EOS on the images it was generated from) and the ratio is under THRESHOLDS. Every row
is kept in the candidates file with its numbers and the reason. Pairs carry ref_chosen_logps /
ref_rejected_logps: summed response log-probs on the CLEAN images, equal to 06's own forward (1e-5;
rows answered from noisy images get one forward, chosen and rejected, as 06 computes them), with
ref_model {path, fingerprint}.
Resume: finished batches are appended to <candidates>.partial (common.ResumeFile, flushed per
batch); a restarted run with the same settings skips them. Batches are fixed by the settings, so
a killed-and-resumed run writes byte-identical files to an uninterrupted one. "The same answer"
is common.normalise_answer's rule, the one 05 and 07 use ("The red." = "red").
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import weakref
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

import common
import vlm
import token_geometry
from common import DataError, ImageError, atomic_write, check_llava_row, normalise_answer, read_rows, row_rng, write_jsonl, write_sidecar

# ---- method: what the paper specifies (edit me) ----
FORMATS = ("sequence", "grid", "pip")
# keep as rejected when ratio <= (sequence) / < (grid, pip) the value for the image count
THRESHOLDS = {"sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
              "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
              "pip": {"*": 0.8}}
INCLUSIVE = {"sequence": True, "grid": False, "pip": False}
NOISE_STD = {"sequence": 0.0, "grid": 225.0, "pip": 49.0}
MIN_PPL = 1.1


def perplexity(sum_logps, n_tokens):
    """exp(-mean log p): two tokens of log-prob -ln 2 each -> 2.0; an empty response -> inf."""
    return math.exp(-sum_logps / n_tokens) if n_tokens > 0 else math.inf


def threshold_for(fmt, n_images, table=THRESHOLDS):
    """The ratio limit for a format and image count (`"*"` = any count); None when the table has none."""
    row = table.get(fmt, {})
    return row.get(n_images, row.get("*"))


def select(answer, truth, ppl, ratio, limit, inclusive, min_ppl=MIN_PPL, truncated=False):
    """One candidate -> 'selected' or the first reason it is not a pair (checked in this order).

    select("red", "blue", 1.5, 0.5, 0.8, True) -> 'selected'
    select("The blue.", "blue", 1.5, 0.5, 0.8, True) -> 'answer equals ground truth'  (common.normalise_answer)
    select("red", "blue", 1.5, 0.7, 0.7, False) -> 'attention ratio above threshold'  (grid: strict <)
    """
    if not truth.strip():
        return "empty ground truth"
    if not answer.strip():
        return "empty answer"
    if normalise_answer(answer) == normalise_answer(truth):
        return "answer equals ground truth"
    if truncated:
        return "answer truncated at --max-new-tokens"
    if not ppl > min_ppl:
        return "ppl not above minimum"
    if limit is None:
        return "no threshold for this format and image count"
    if not (ratio <= limit if inclusive else ratio < limit):
        return "attention ratio above threshold"
    return "selected"


def add_noise(pixels, box, std, rng):
    """(H, W, 3) uint8 -> copy with N(0, std) added inside box (x0, y0, x1, y1; None = everywhere),
    in float, rounded and clipped to [0, 255] (the authors' uint8 arithmetic wrapped around).
    std 0 -> an identical copy; pixels outside the box are never touched."""
    out = pixels.astype(np.float32)
    x0, y0, x1, y1 = box if box is not None else (0, 0, pixels.shape[1], pixels.shape[0])
    region = out[y0:y1, x0:x1]  # a view: noise lands in `out`
    region += rng.normal(0.0, std, region.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def box_weights(token_boxes, box):
    """(n, 4) token boxes in original pixels (token_geometry.image_token_boxes; NaN = sees no pixels) and a
    pixel box (x0, y0, x1, y1) -> (n,) share of each token's box inside it.
    toy (64x64 squash, 8-px patches): the 1x2 collage's left cell (0, 40, 448, 488) of 936x488 ->
    a token of the 4th column 0.83 (30.6 of its 24..32 px), of the top row 0.34 (the label strip)."""
    b = np.asarray(token_boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = box
    with np.errstate(invalid="ignore"):
        wx = np.clip(np.minimum(b[:, 2], x1) - np.maximum(b[:, 0], x0), 0, None) / (b[:, 2] - b[:, 0])
        wy = np.clip(np.minimum(b[:, 3], y1) - np.maximum(b[:, 1], y0), 0, None) / (b[:, 3] - b[:, 1])
    return np.nan_to_num(wx * wy, nan=0.0)


def response_attention(query, key, attention_mask, scaling, rows, softcap=None, causal=True):
    """The probe: mean over heads and response rows of one layer's attention probabilities.

    query (B, H, T, D) after RoPE, key (B, Hkv, T, D) (Hkv divides H: grouped-query heads are
    repeated like transformers' repeat_kv), attention_mask as the layer got it (allowed_keys),
    rows: B pairs (start, end) of query positions; softcap: Gemma 2's logit cap (tanh) or None.
    returns (B, T) float32: row b = mean_{h, s <= t < end} softmax(q_t k^T * scaling + mask)[h, t, :].
    Only (H, end - start, T) scores are formed per row — never the (H, T, T) of all positions.
    causal=False: a cross-attention layer (Llama 3.2 Vision), whose K keys are the visual features of
    the row's images (image_keys) under the cross-attention mask -> (B, K), the same formula.
    """
    import torch

    B, H, T, D = query.shape
    key = key.repeat_interleave(H // key.shape[1], dim=1)  # (B, H, T, D)
    scaling = D ** -0.5 if scaling is None else scaling
    out = torch.zeros(B, key.shape[2], dtype=torch.float32, device=query.device)
    for b, (s, e) in enumerate(rows):
        if e <= s:
            continue
        scores = torch.matmul(query[b, :, s:e].float(), key[b].float().transpose(-1, -2)) * scaling  # (H, R, T)
        scores = torch.tanh(scores / softcap) * softcap if softcap else scores
        allowed = allowed_keys(attention_mask, b, torch.arange(s, e, device=query.device), key.shape[2], causal)
        out[b] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(dim=(0, 1))
    return out


def allowed_keys(attention_mask, b, qpos, K, causal=True):
    """-> (R, K) bool: which of the K keys the queries at positions `qpos` (R,) of row b see, from
    the mask the layer got under any attention implementation: None (causal, no padding),
    (B|1, 1, Q, K) bool (SDPA: True = attend) or float (eager: 0, or the dtype's min: added),
    (B, K) (flash: key padding; causal). Q is K, or the last Q positions while decoding.
    b may also be a 1-D tensor of rows: -> (len(b), R, K), or (R, K) where every row sees alike.
    causal=False: cross-attention, whose keys are the images' features, not positions: `qpos` index
    the mask's Q rows (the layer's queries) and the mask alone decides (Mllama: a row before any
    image arrives all 0, i.e. every key allowed, and the layer attends so)."""
    import torch

    seen = torch.arange(K, device=qpos.device)[None, :] <= qpos[:, None] if causal else \
        torch.ones(len(qpos), K, dtype=torch.bool, device=qpos.device)  # (R, K)
    if attention_mask is None:
        return seen
    if attention_mask.dim() == 2:
        return seen & attention_mask[b, -K:].bool().unsqueeze(-2)
    m = attention_mask[b if attention_mask.shape[0] > 1 else 0, 0]  # (Q, K), or (len(b), Q, K)
    m = m[..., qpos - (K - m.shape[-2]) if causal else qpos, -K:]  # (R, K), or (len(b), R, K)
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def attention_ratio(fmt, maps, target, weights=None):
    """Per-image token maps (mean response-row attention on each of its visual tokens) -> the ratio.

    sequence: mean(maps[target-1]) / sum_i mean(maps[i]); grid, pip: sum(maps[0] * weights) / sum(maps[0]).
    attention_ratio("sequence", [np.full((2, 2), .1), np.full((2, 2), .3)], 2) -> 0.75
    """
    if fmt == "sequence":
        means = [float(m.mean()) for m in maps]
        return means[target - 1] / sum(means) if sum(means) > 0 else 0.0
    total = float(maps[0].sum())
    return float((maps[0] * weights).sum()) / total if total > 0 else 0.0


def image_keys(n_keys, counts):
    """Where each image sits among a cross-attention layer's n_keys keys -> per row, one index array
    per image. Llama 3.2 Vision lays the batch's visual features out as (image slot, tile, patch):
    every row has the slots of the row with the most images, each slot max_image_tiles tiles, the
    image's real tiles first. counts (per row, each image's real keys: token_geometry.image_key_boxes)
    take the start of their slot, so padded tiles and slots never dilute an image's mean.
    2 slots of 4 tiles x 5 keys, a 4-tile and a 2-tile image: image_keys(40, [[20, 10]]) -> [[0..19, 20..29]]
    """
    slot = n_keys // max(len(row) for row in counts)
    if n_keys % max(len(row) for row in counts) or any(n > slot for row in counts for n in row):
        raise ValueError(f"image_keys: {n_keys} keys do not hold images of {counts} keys in equal slots")
    return [[k * slot + np.arange(n) for k, n in enumerate(row)] for row in counts]


# ---- plumbing ----
PROBE_NAME = "mia_probe"
_PROBE = {"layer": None, "rows": None, "out": None, "steps": []}  # set by probing(); read by the attention function


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """The layer's own attention implementation, as the model was loaded with it; at the probed
    layer, while probing(), also the response rows' attention, from the same query, key and mask."""
    out = _wrapped(module)(module, query, key, value, attention_mask, **kwargs)
    if _PROBE["rows"] is not None and getattr(module, "layer_idx", None) == _PROBE["layer"]:
        scaling, softcap, causal = kwargs.get("scaling"), kwargs.get("softcap"), module not in _CROSS
        if _PROBE["rows"] == "last":  # generating: each step's newest query row, over the cache
            _PROBE["steps"].append(last_row_attention(query, key, attention_mask, scaling, softcap, causal))
        else:
            _PROBE["out"] = response_attention(query, key, attention_mask, scaling, _PROBE["rows"], softcap, causal)
    return out


_WRAPS = {}  # id(the text config) -> the attention implementation the probe wraps ("sdpa", "eager", ...)
_CROSS = weakref.WeakSet()  # the cross-attention modules (install_probe): their keys are visual features


def _wrapped(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = _WRAPS[id(module.config)]
    if impl == "eager":  # each family's own eager function (Gemma 2's softcap, sinks ...), in its modeling file
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def last_row_attention(query, key, attention_mask, scaling, softcap=None, causal=True):
    """The probe while generating: one step's LAST query row (the one that predicts the next token),
    heads averaged, over all keys in the cache -> (B, K) float32. In the prefill it is the prompt's
    last position; in a decode step the one fed token (position K-1), under the mask the layer got.
    causal=False (cross-attention): the keys are the images' features, the same at every step (a
    decode step reads them from the cache), under the mask's last row."""
    import torch

    H, D = query.shape[1], query.shape[-1]
    key = key.repeat_interleave(H // key.shape[1], dim=1)  # (B, H, K, D)
    scaling = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query[:, :, -1:].float(), key.float().transpose(-1, -2)) * scaling  # (B, H, 1, K)
    scores = torch.tanh(scores / softcap) * softcap if softcap else scores
    K = key.shape[2]
    last = torch.tensor([K - 1 if causal else query.shape[2] - 1], device=query.device)
    allowed = allowed_keys(attention_mask, torch.arange(query.shape[0], device=query.device), last, K, causal)  # (B|1, 1, K)
    return torch.softmax(scores.masked_fill(~allowed.unsqueeze(-3), float("-inf")), dim=-1).mean(dim=(1, 2))  # (B, K)


def install_probe(model):
    """Route the language model's attention through _probe_attention (vision tower unchanged), which
    wraps the implementation the model was loaded with (SDPA by default; eager where a family needs
    it, e.g. Gemma 2's logit softcap) -> the number of decoder layers (vlm.decoder_layers).
    Cross-attention layers (Llama 3.2 Vision) call the same interface: they are noted, so that the
    probe reads their keys as the images' features (causal=False) rather than as positions.
    subtle: a registered function also needs a registered mask builder (the wrapped one's), else it gets no mask."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    _CROSS.update(cross_attention_layers(model).values())
    text = model.config.get_text_config()
    impl = _WRAPS.get(id(text), text._attn_implementation or "eager")
    _WRAPS[id(text)] = impl
    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    # a config that is its own text config (Chameleon: no text_config) takes the name itself
    model.set_attn_implementation(PROBE_NAME if text is model.config else {"text_config": PROBE_NAME})
    return len(vlm.decoder_layers(model))


def cross_attention_layers(model):
    """{index: attention module} of the decoder layers that read the images through cross-attention
    (Llama 3.2 Vision: `cross_attn`, every 5th layer from the 4th): their keys are the visual features,
    the text holds one placeholder token per image. {} for a model with visual tokens in the sequence."""
    return {i: layer.cross_attn for i, layer in enumerate(vlm.decoder_layers(model))
            if getattr(getattr(layer, "cross_attn", None), "layer_idx", None) == i}


def attention_layers(model):
    """Indices of the decoder layers the probe can read: those whose softmax attention weighs the
    visual tokens. Self-attention layers: all of them, except in hybrid models (Qwen3.5: linear-attention
    layers between them). A cross-attention model's cross-attention layers only: its self-attention
    layers see one placeholder token per image, never the image."""
    cross = cross_attention_layers(model)
    return list(cross) or [i for i, layer in enumerate(vlm.decoder_layers(model))
                           if getattr(getattr(layer, "self_attn", None), "layer_idx", None) == i]


def default_layer(model):
    """The paper's layer: the middle one (n_layers // 2), or the attention layer nearest to it
    (Llama 3.2 Vision 11B: layer 18, of cross-attention layers 3, 8, ..., 38 of 40)."""
    middle = len(vlm.decoder_layers(model)) // 2
    return min(attention_layers(model), key=lambda i: (abs(i - middle), i))


@contextlib.contextmanager
def probing(layer, rows):
    _PROBE.update(layer=layer, rows=rows, out=None, steps=[])
    try:
        yield _PROBE
    finally:
        _PROBE.update(layer=None, rows=None)


_NEED = {"sequence": ("n_images", "target"), "grid": ("target", "cells"), "pip": ("target", "inset")}


def make_item(row, path, line, index):
    """A 01-03 row -> the work item 04 needs; bad or missing fields raise DataError naming them."""
    images = check_llava_row(row, path, line)
    mia = row.get("mia")
    if not isinstance(mia, dict):
        raise DataError(path, line, "mia", "missing: 04 reads the rows 01_make_sequence / 02_make_grid / 03_make_pip write")
    fmt = mia.get("format")
    if fmt not in FORMATS:
        raise DataError(path, line, "mia.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    for k in _NEED[fmt]:
        if k not in mia:
            raise DataError(path, line, f"mia.{k}", f"missing (a {fmt} row needs {', '.join(_NEED[fmt])})")
    prompt, truth = row["conversations"][0]["value"], row["conversations"][1]["value"]
    if prompt.count("<image>") != len(images):
        raise DataError(path, line, "conversations[0].value",
                        f"{prompt.count('<image>')} <image> markers for {len(images)} images")
    k = mia["target"]
    n_regions = {"sequence": len(images), "grid": len(mia.get("cells", [])), "pip": 1}[fmt]
    if not isinstance(k, int) or not 1 <= k <= n_regions:
        raise DataError(path, line, "mia.target", f"{k!r} is not an index 1..{n_regions}")
    if fmt != "sequence" and len(images) != 1:
        raise DataError(path, line, "image", f"a {fmt} row has one image, not {len(images)}")
    n = len(images) if fmt == "sequence" else (len(mia["cells"]) if fmt == "grid" else mia.get("n_images", 2))
    return {"i": index, "id": str(row["id"]), "row": row, "image": images, "prompt": prompt, "truth": truth,
            "format": fmt, "n_images": n, "target": k, "mia": mia, "where": f"{path}:{line}"}


def load_items(args):
    """Rows of every --data file (the first --limit of each), this shard's only, ids unique."""
    items, seen = [], {}
    for path in args.data:
        taken = 0
        for line, row in read_rows(path):
            item = make_item(row, path, line, len(items))
            if item["id"] in seen:
                raise DataError(path, line, "id", f"{item['id']!r} also at {seen[item['id']]}")
            seen[item["id"]] = item["where"]
            if args.num_shards > 1 and zlib.crc32(item["id"].encode()) % args.num_shards != args.shard:
                continue
            if args.limit and taken >= args.limit:
                break
            item["i"], taken = len(items), taken + 1
            items.append(item)
    return items


def make_batches(items, batch_size):
    """Fixed batches (lists of item indices), similar rows together to cut padding: a function of
    the items alone, so a resumed run re-forms exactly the batches an uninterrupted run forms."""
    order = sorted(items, key=lambda it: (FORMATS.index(it["format"]), len(it["image"]), it["n_images"], it["i"]))
    return [[it["i"] for it in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def corrupt(item, images, args):
    """The images the model answers from: Gaussian noise as in the authors' released code, on grid
    (the target cell, std 225) and pip (the whole image, std 49)."""
    std = 0.0 if args.no_noise else {"grid": args.grid_noise, "pip": args.pip_noise}.get(item["format"], 0.0)
    if not std:
        return images, 0.0
    size = item["mia"].get("size")
    if size is not None and list(images[0].size) != list(size):
        raise DataError(item["where"], None, "mia.size", f"{size} but the image is {list(images[0].size)}")
    box = item["mia"]["cells"][item["target"] - 1] if item["format"] == "grid" else None
    rng = np.random.default_rng(row_rng(args.seed, f"noise:{item['id']}").getrandbits(64))
    from PIL import Image

    return [Image.fromarray(add_noise(np.asarray(images[0]), box, std, rng))], std


def probe_forward(model, processor, questions, images, answers, layer, counts=None):
    """Teacher-forced forward over prompt + answer with the probe on -> per-row numbers.
    counts: per row, each image's visual-token count (token_boxes); None: one run of tokens each.
    returns attn (B, T) numpy (a cross-attention layer: (B, K) over its visual keys), positions (B lists
    of per-image index arrays into attn's columns), sum_logps (B,), n_tokens (B,)."""
    import torch

    batch = vlm.to_model(vlm.build_inputs(processor, questions, images, answers=answers), model)
    labels = batch["labels"]
    rows = []
    for b in range(labels.shape[0]):  # row t predicts token t+1: rows = labelled positions - 1
        pos = (labels[b] != vlm.IGNORE_INDEX).nonzero().flatten()
        rows.append((int(pos[0]) - 1, int(pos[-1])) if len(pos) else (0, 0))
    with torch.no_grad(), probing(layer, rows) as probe:
        sum_lp, _, n_tok = vlm.response_logps(model, batch)
        attn = probe["out"]
    if attn is None:
        raise RuntimeError(f"the probe did not run at layer {layer}: is the model's attention routed through {PROBE_NAME}?")
    positions = visual_positions(model, batch["input_ids"], counts or [[None] * len(ims) for ims in images],
                                 attn.shape[1])
    return attn.cpu().numpy(), positions, sum_lp.float().cpu().tolist(), n_tok.cpu().tolist()


def generate_and_probe(model, processor, questions, images, max_new_tokens, layer, counts=None):
    """Greedy answers with the probe and the answers' log-probs taken DURING generation -> answers,
    finished, attn (B arrays over the left-padded prompt's positions), positions, sum_logps, n_tokens,
    exact (B bools), prompt (generation's KV cache, for vlm.score_after_prompt; None where it cannot
    be put back to the prompt). Each step's last query row at `layer` (prefill: the prompt's last
    position; then each fed token) is the teacher-forced row for the same token, with the same keys before it over
    the KV cache; the answer's log-probs are the steps' raw logits, log-softmaxed. Both equal
    probe_forward's only where the generated tokens ARE the tokens probe_forward scores (render_pair's
    response + stop token, vlm.response_ids): `exact` says where; other rows need probe_forward.
    Visual tokens all lie in the prompt, so the maps keep the prefill's keys only: the prompt's
    positions (a cross-attention layer: the visual features, the same keys at every step)."""
    import torch

    with torch.no_grad(), probing(layer, "last") as probe:
        g = vlm.generate_scored(model, processor, questions, images, max_new_tokens, keep_prompt=True)
        steps = probe["steps"]
    if not steps:
        raise RuntimeError(f"the probe did not run at layer {layer}: is the model's attention routed through {PROBE_NAME}?")
    K = steps[0].shape[1]  # the prefill's keys
    maps = torch.stack([s[:, :K] for s in steps], dim=1).cpu().numpy()  # (B, steps, K)
    want = vlm.response_ids(processor, questions, g["texts"])
    exact = [t == w and len(t) <= maps.shape[1] for t, w in zip(g["tokens"], want)]
    attn = [maps[b, :len(t)].mean(axis=0) if len(t) else np.zeros(K, np.float32) for b, t in enumerate(g["tokens"])]
    positions = visual_positions(model, g["input_ids"], counts or [[None] * len(ims) for ims in images], K)
    return (g["texts"], g["finished"], attn, positions, [float(sum(x)) for x in g["token_logps"]],
            [len(t) for t in g["tokens"]], exact, g["prompt"])


def visual_positions(model, input_ids, counts, n_keys):
    """Each image's visual tokens among the probed layer's n_keys keys: their positions in the
    sequence (vlm.image_positions), or a cross-attention model's visual features (image_keys)."""
    if cross_attention_layers(model):
        return image_keys(n_keys, counts)
    return vlm.image_positions(input_ids, vlm.image_token_id(model), counts)


def answer_and_probe(model, processor, qs, seen, args, ctx, counts):
    """--probe teacher-forced: generate, then probe_forward over prompt + answer. --probe
    during-generation: generate_and_probe, and probe_forward only for the rows it cannot score
    exactly (their generated tokens differ from the scored ones) -> answers, finished, attn,
    positions, sum_logps, n_tokens, exact (B bools: numbers taken during generation), prompt
    (generate_and_probe's; None in teacher-forced mode)."""
    if args.probe == "teacher-forced":
        answers, finished = vlm.generate(model, processor, qs, seen, args.max_new_tokens, return_finished=True)
        attn, positions, sum_lp, n_tok = probe_forward(model, processor, qs, seen, answers, ctx["layer"], counts)
        return answers, finished, list(attn), positions, sum_lp, n_tok, [False] * len(qs), None
    answers, finished, attn, positions, sum_lp, n_tok, exact, prompt = generate_and_probe(
        model, processor, qs, seen, args.max_new_tokens, ctx["layer"], counts)
    redo = [b for b, e in enumerate(exact) if not e]
    if redo:
        a2, p2, s2, n2 = probe_forward(model, processor, [qs[b] for b in redo], [seen[b] for b in redo],
                                       [answers[b] for b in redo], ctx["layer"], [counts[b] for b in redo])
        for k, b in enumerate(redo):
            attn[b], positions[b], sum_lp[b], n_tok[b] = a2[k], p2[k], s2[k], n2[k]
    ctx.setdefault("probe_rows", Counter()).update(during=len(qs) - len(redo), teacher_forced=len(redo))
    return answers, finished, attn, positions, sum_lp, n_tok, exact, prompt


def token_boxes(processor, images, cache, token_id=None, key_patch=None):
    """token_geometry.image_token_boxes for one prompt's images, cached by their sizes (all it depends
    on) -> (each image's visual-token count, its boxes or None, why there are none or None). A
    processor the geometry does not follow still gives counts (the processor's own expansion):
    enough for sequence rows, which weigh whole images; grid and pip rows are skipped with the reason.
    key_patch: a cross-attention model's vision patch size: its visual tokens are the keys of its
    cross-attention layers (token_geometry.image_key_boxes), not positions in the text."""
    key = tuple(im.size for im in images)
    if key not in cache and key_patch:
        boxes = token_geometry.image_key_boxes(processor, images, key_patch)
        cache[key] = [len(b) for b in boxes], boxes, None
    if key not in cache:
        try:
            boxes = token_geometry.image_token_boxes(processor, images, token_id)
            cache[key] = [len(b) for b in boxes], boxes, None
        except token_geometry.NoGeometry as e:
            cache[key] = vlm.emitted_image_tokens(processor, images, token_id), None, str(e)
    return cache[key]


def row_numbers(item, attn, positions, boxes):
    """One row's probe output (attn (T,), each image's token positions and token boxes) ->
    (ratio, per-image attention mass, per-image token maps: the attention on each visual token)."""
    maps = [attn[pos] for pos in positions]
    fmt, mia = item["format"], item["mia"]
    box = mia["cells"][item["target"] - 1] if fmt == "grid" else mia["inset"] if fmt == "pip" else None
    weights = box_weights(boxes[0], box) if box is not None else None
    return attention_ratio(fmt, maps, item["target"], weights), [float(m.sum()) for m in maps], maps


def candidate(it, answer, ratio, masses, ppl, n_tokens, noise_std, args, ctx, truncated=False):
    """Every row's record: its answer, the probe's numbers and why it is or is not a pair."""
    limit = threshold_for(it["format"], it["n_images"], ctx["thresholds"])
    reason = select(answer, it["truth"], ppl, ratio, limit, INCLUSIVE[it["format"]], args.min_ppl, truncated=truncated)
    return {"id": it["id"], "format": it["format"], "n_images": it["n_images"], "target": it["target"],
            "answer": answer, "truth": it["truth"], "correct": normalise_answer(answer) == normalise_answer(it["truth"]),
            "ratio": round(ratio, 6), "threshold": limit, "attn_images": [round(m, 6) for m in masses],
            "ppl": round(ppl, 6) if math.isfinite(ppl) else None, "n_tokens": n_tokens, "noise_std": noise_std,
            "selected": reason == "selected", "reason": reason}


def make_pair(it, cand, ref_chosen_logps, ref_rejected_logps, ctx):
    """A selected candidate -> the pair 05 and 06 read; the source row's extra fields (e.g. `toy`) kept."""
    extra = {k: v for k, v in it["row"].items() if k not in ("id", "image", "conversations", "mia")}
    probe = {"layer": ctx["layer"], **{k: cand[k] for k in ("ratio", "threshold", "attn_images", "ppl", "noise_std")}}
    return {"id": it["id"], "image": it["image"], "prompt": it["prompt"], "chosen": it["truth"], "rejected": cand["answer"],
            **extra, "mia": it["mia"], "probe": probe, "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps, "ref_model": ctx["ref_model"],
            "ref_text": vlm.text_fingerprint(ctx["processor"], it["prompt"], [it["truth"], cand["answer"]])}


def run_batch(model, processor, items, args, ctx):
    """Answer, probe, select, reference log-probs for one batch -> records {i, candidate, pair}."""
    key_patch = model.config.vision_config.patch_size if cross_attention_layers(model) else None
    out, ok, clean, seen, noise, boxes, n_vis = [], [], [], [], [], [], []
    for it in items:
        try:
            ims = [common.load_image(args.image_root, p) for p in it["image"]]
        except ImageError as e:
            out.append({"i": it["i"], "candidate": {"id": it["id"], "format": it["format"], "selected": False,
                                                    "reason": f"unreadable image: {e}"}, "pair": None})
            continue
        counts, bx, why = token_boxes(processor, ims, ctx["boxes"], vlm.image_token_id(model), key_patch)
        if why and it["format"] != "sequence":  # no geometry: a target region has no tokens to weigh
            out.append({"i": it["i"], "candidate": {"id": it["id"], "format": it["format"], "selected": False,
                                                    "reason": f"no token geometry: {why}"}, "pair": None})
            continue
        noisy, std = corrupt(it, ims, args)
        ok.append(it), clean.append(ims), seen.append(noisy), noise.append(std), boxes.append(bx), n_vis.append(counts)
    if not ok:
        return out, []
    qs = [it["prompt"] for it in ok]
    answers, finished, attn, positions, sum_lp, n_tok, exact, prompt = answer_and_probe(
        model, processor, qs, seen, args, ctx, n_vis)
    recs, viz = [], []
    for b, it in enumerate(ok):
        ratio, masses, maps = row_numbers(it, attn[b], positions[b], boxes[b])
        cand = candidate(it, answers[b], ratio, masses, perplexity(sum_lp[b], n_tok[b]), n_tok[b], noise[b], args, ctx,
                         truncated=not finished[b])
        recs.append({"i": it["i"], "candidate": cand, "pair": None})
        if it["id"] in ctx["viz_ids"] and boxes[b] is not None:
            viz.append((it, seen[b], maps, boxes[b], cand))
    chosen = [(r, it, ims) for r, it, ims in zip(recs, ok, clean) if r["candidate"]["selected"]]
    if chosen and args.probe == "teacher-forced":  # reference log-probs on the CLEAN images: chosen rows then rejected rows, one forward (as 06)
        q, ims = [it["prompt"] for _, it, _ in chosen], [im for _, _, im in chosen]
        lp_c, lp_r = vlm.pair_logps(model, processor, q, ims, [it["truth"] for _, it, _ in chosen],
                                       [r["candidate"]["answer"] for r, _, _ in chosen])
        for k, (r, it, _) in enumerate(chosen):
            r["pair"] = make_pair(it, r["candidate"], lp_c[k], lp_r[k], ctx)
    elif chosen:
        reference_during_generation(model, processor, recs, ok, clean, noise, sum_lp, prompt, ctx)
    return out + recs, viz


def reference_during_generation(model, processor, recs, ok, clean, noise, sum_lp, prompt, ctx):
    """Reference log-probs (on the CLEAN images), --probe during-generation. A row answered from the
    clean images (no noise: sequence rows) was scored on them already: its rejected reference is its
    sum_logps, and its chosen is scored from generation's KV cache of the same prompt
    (vlm.score_after_prompt: the chosen tokens only, no vision tower, no prompt again). The others
    (answered from noisy images, or a model whose cache cannot be put back) get one forward as
    before: every chosen row, then the rejected rows still needed."""
    import torch

    sel = [b for b, r in enumerate(recs) if r["candidate"]["selected"]]
    cached = [b for b in sel if noise[b] == 0.0 and prompt is not None]
    fwd = [b for b in sel if b not in cached]
    again = [b for b in fwd if noise[b] != 0.0]
    ref_c, ref_r = {}, {b: sum_lp[b] for b in sel if noise[b] == 0.0}
    if cached:
        chosen = vlm.response_ids(processor, [ok[b]["prompt"] for b in cached], [ok[b]["truth"] for b in cached])
        ref_c.update(zip(cached, vlm.score_after_prompt(model, prompt, cached, chosen)))
    if fwd:
        rows = fwd + again
        answers = [ok[b]["truth"] for b in fwd] + [recs[b]["candidate"]["answer"] for b in again]
        batch = vlm.to_model(vlm.build_inputs(processor, [ok[b]["prompt"] for b in rows], [clean[b] for b in rows],
                                              answers=answers), model)
        with torch.no_grad():
            lp = vlm.response_logps(model, batch)[0].float().cpu().tolist()
        ref_c.update(zip(fwd, lp)), ref_r.update(zip(again, lp[len(fwd):]))
    for b in sel:
        recs[b]["pair"] = make_pair(ok[b], recs[b]["candidate"], ref_c[b], ref_r[b], ctx)
    ctx.setdefault("probe_rows", Counter()).update(ref_chosen_cached=len(cached), ref_chosen_forward=len(fwd),
                                                   ref_rejected_forward=len(again))


def save_viz(path, images, maps, boxes, cand, height=192):
    """The paper's Fig. 2 picture: each image with the attention of its visual tokens painted on
    the pixels each token sees (views that overlap, e.g. tiles and a global view, add up)."""
    from PIL import Image, ImageDraw, ImageOps

    peak = max(float(m.max()) for m in maps) or 1.0
    tiles = []
    for k, (im, m, bx) in enumerate(zip(images, maps, boxes), 1):
        heat = np.zeros((im.height, im.width), dtype=np.float64)
        for a, (x0, y0, x1, y1) in zip(m, bx):
            if np.isfinite(x0):
                heat[max(0, int(y0)):max(0, math.ceil(y1)), max(0, int(x0)):max(0, math.ceil(x1))] += a
        view = im.resize((max(1, round(height * im.width / im.height)), height))
        gray = Image.fromarray(np.uint8(255 * np.clip(heat / max(peak, heat.max()), 0, 1))).resize(view.size, Image.NEAREST)
        tile = Image.blend(view, ImageOps.colorize(gray, black="navy", mid="yellow", white="red"), 0.55)
        label = f"Image{k} {m.sum():.3f}" + (" target" if cand["format"] == "sequence" and k == cand["target"] else "")
        ImageDraw.Draw(tile).text((4, 4), label, fill="white")
        tiles.append(tile)
    title = f"{cand['id']}: ratio {cand['ratio']:.3f} | {cand['answer']!r} vs {cand['truth']!r} | {cand['reason']}"
    width = max(sum(t.width + 4 for t in tiles), int(ImageDraw.Draw(tiles[0]).textlength(title)) + 8)
    canvas = Image.new("RGB", (width, height + 16), "white")
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    for k, t in enumerate(tiles):
        canvas.paste(t, (sum(u.width + 4 for u in tiles[:k]), 16))
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG")


def summarise(cands):
    """Per-format counts, yield, the mean ratio of right vs wrong answers, and the threshold as a
    hallucination detector: precision = share of flagged answers (ratio under the threshold)
    that are wrong, recall = share of wrong answers that are flagged."""
    table = {}
    for c in cands:
        t = table.setdefault(c["format"], {"prompts": 0, "right": 0, "wrong": 0, "pairs": 0, "_rr": [], "_rw": [],
                                           "_flag": 0, "_flag_wrong": 0})
        t["prompts"] += 1
        if "ratio" in c:
            t["right" if c["correct"] else "wrong"] += 1
            t["_rr" if c["correct"] else "_rw"].append(c["ratio"])
            below = c["ratio"] <= c["threshold"] if INCLUSIVE[c["format"]] else c["ratio"] < c["threshold"]
            t["_flag"] += below
            t["_flag_wrong"] += below and not c["correct"]
        t["pairs"] += c["selected"]
    for t in table.values():
        t["yield"] = round(t["pairs"] / t["prompts"], 4) if t["prompts"] else 0.0
        for k, name in (("_rr", "mean_ratio_right"), ("_rw", "mean_ratio_wrong")):
            vals = t.pop(k)
            t[name] = round(sum(vals) / len(vals), 4) if vals else None
        flag, flag_wrong = t.pop("_flag"), t.pop("_flag_wrong")
        t["precision"] = round(flag_wrong / flag, 4) if flag else None
        t["recall"] = round(flag_wrong / t["wrong"], 4) if t["wrong"] else None
    return table


def main(args):
    t0 = time.time()
    common.set_threads(args.threads)
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    items = load_items(args)
    out, cands_path, viz_dir = output_paths(args)
    with common.output_lock(out):  # a second 04 on the same --out stops here, before any work
        model, processor = vlm.load_model(args.model, dtype=args.dtype, device=vlm.pick_device(args.device),
                                          max_image_tokens=args.max_image_tokens)
        install_probe(model)
        layer = default_layer(model) if args.layer is None else args.layer
        if layer not in attention_layers(model):
            raise SystemExit(f"04_gen_pairs: --layer {layer} is not a layer the probe can read in this model "
                             f"(those are {attention_layers(model)}: softmax attention over the visual tokens)")
        if cross_attention_layers(model):
            print(f"04_gen_pairs: {type(model).__name__} reads the images through cross-attention layers "
                  f"{attention_layers(model)}: the probe reads layer {layer}'s attention over the visual features")
        ref_model = {"path": str(args.model), "fingerprint": vlm.model_fingerprint(model), "dtype": vlm.dtype_name(model),
                     "image_settings": vlm.image_settings_id(processor)}  # 06 refuses other weights or image settings
        viz_ids = {it["id"] for f in FORMATS for it in [x for x in items if x["format"] == f][:args.viz]}
        thresholds = parse_thresholds(args.threshold)
        ctx = {"layer": layer, "boxes": {}, "thresholds": thresholds, "ref_model": ref_model, "viz_ids": viz_ids,
               "processor": processor}
        config = resume_config(args, layer, ref_model, thresholds)
        batches = make_batches(items, args.batch_size)
        partial = common.ResumeFile(str(cands_path) + ".partial", config, key="i")
        partial.keep([i for b in batches if all(i in partial.done for i in b) for i in b])  # whole batches only
        by_i = {it["i"]: it for it in items}
        todo = [b for b in batches if not all(i in partial.done for i in b)]
        n_sel = sum(r["candidate"]["selected"] for r in partial.done.values())
        with common.Progress(len(items), "04 pairs", initial=len(partial.done)) as bar:
            for b in todo:
                recs, viz = run_batch(model, processor, [by_i[i] for i in b], args, ctx)
                partial.add(recs)
                for it, ims, maps, boxes, cand in viz:
                    save_viz(viz_dir / f"{common.safe_name(it['id'])}.png", ims, maps, boxes, cand)
                n_sel += sum(r["candidate"]["selected"] for r in recs)
                bar.update(len(recs), pairs=n_sel, yld=f"{n_sel / len(partial.done):.1%}")
        if ctx.get("probe_rows"):  # a family or rows where generation's numbers are not the scored ones: say so
            print(f"04_gen_pairs: --probe during-generation: {dict(ctx['probe_rows'])} (teacher_forced: generated tokens "
                  f"differ from the scored ones; ref_chosen_cached: scored from generation's prompt cache; *_forward: "
                  f"answered from noisy images, or a cache that cannot be put back to the prompt)")
        return finish(args, items, partial, layer, ref_model, t0, out, cands_path)


def output_paths(args):
    """-> (pairs, candidates, viz folder) of this process: --out, with `-SS-of-NN` for a shard
    (pairs.jsonl, --shard 1 --num-shards 4 -> pairs-01-of-04.jsonl), --candidates or
    <out>.candidates.jsonl, and <out>.viz for the heatmaps."""
    out = Path(args.out)
    if args.num_shards > 1:
        out = out.with_name(f"{out.stem}-{args.shard:02d}-of-{args.num_shards:02d}{out.suffix}")
    return out, args.candidates or out.with_name(f"{out.stem}.candidates.jsonl"), out.with_name(f"{out.stem}.viz")


def resume_config(args, layer, ref_model, thresholds):
    """Everything the output depends on; a .partial left with other settings is refused."""
    keys = ("image_root", "batch_size", "max_new_tokens", "seed", "limit", "shard", "num_shards", "no_noise",
            "grid_noise", "pip_noise", "min_ppl", "dtype", "max_image_tokens", "probe")
    cfg = {"data": [[str(p), os.path.getsize(p), os.path.getmtime(p)] for p in args.data], "ref_model": ref_model,
           "layer": layer, **{k: getattr(args, k) for k in keys}, "thresholds": thresholds}
    return json.loads(json.dumps(cfg, default=str))  # as it reads back from the file


def finish(args, items, partial, layer, ref_model, t0, out, cands_path):
    """Write candidates and pairs in input order (whatever the batching), sidecars, the yield table."""
    recs = [partial.done[i] for i in sorted(partial.done)]
    cands = [r["candidate"] for r in recs]
    pairs = [r["pair"] for r in recs if r["pair"] is not None]
    table, reasons = summarise(cands), Counter(c["reason"].split(":")[0] for c in cands)
    counts = {"rows": len(items), "pairs": len(pairs), "by_format": table, "reasons": dict(reasons)}
    write_jsonl(cands_path, cands)
    write_sidecar(cands_path, args, counts=counts, layer=layer, ref_model=ref_model)
    write_jsonl(out, pairs)
    write_sidecar(out, args, counts=counts, layer=layer, ref_model=ref_model, candidates=str(cands_path))
    partial.remove()
    fr = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'format':<9} {'prompts':>7} {'right':>6} {'wrong':>6} {'pairs':>6} {'yield':>7} "
          f"{'ratio right':>11} {'ratio wrong':>11} {'precision':>9} {'recall':>6}")
    for fmt, t in table.items():
        print(f"{fmt:<9} {t['prompts']:>7} {t['right']:>6} {t['wrong']:>6} {t['pairs']:>6} {t['yield']:>7.1%} "
              f"{fr(t['mean_ratio_right']):>11} {fr(t['mean_ratio_wrong']):>11} {fr(t['precision']):>9} {fr(t['recall']):>6}")
    print(f"04_gen_pairs: {len(items)} rows -> {len(pairs)} pairs in {out} (candidates: {cands_path}) | "
          f"layer {layer} | {', '.join(f'{n} {r}' for r, n in reasons.most_common())} | {time.time() - t0:.1f} s")
    return pairs, cands


def parse_thresholds(specs):
    """['grid:9=0.35', 'pip=0.7'] -> a copy of THRESHOLDS with those limits replaced: FORMAT:N sets one
    image count, FORMAT alone every count (`sequence=inf` keeps every wrong answer: no attention selection)."""
    table = {f: dict(v) for f, v in THRESHOLDS.items()}
    for s in specs:
        key, _, val = s.partition("=")
        fmt, _, n = key.partition(":")
        if fmt not in FORMATS or not val:
            raise ValueError(f"{s!r}: expected FORMAT[:N]=VALUE with FORMAT one of {', '.join(FORMATS)}")
        if n:
            table[fmt][int(n)] = float(val)
        else:
            table[fmt] = {"*": float(val)}
    return table


def get_args(argv=None):
    toy = Path("data/toy")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[3:7]))
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, nargs="+", default=[toy / f"{n}.jsonl" for n in ("sequence", "grid", "pip")],
                   help="JSONL files written by 01-03")
    g.add_argument("--image-root", type=Path, default=toy / "images", help="folder the rows' image paths are relative to")
    g.add_argument("--model", type=Path, default=Path("models/toy-llava"), help="local HF model directory (the DPO reference)")
    g.add_argument("--out", type=Path, default=toy / "pairs.jsonl", help="pairs JSONL (with --num-shards > 1: -SS-of-NN added)")
    g.add_argument("--candidates", type=Path, help="every row's answer, numbers and reason (default: <out>.candidates.jsonl)")
    g.add_argument("--limit", type=int, default=0, help="first N rows of each --data file (of this shard) (0: all)")
    g.add_argument("--viz", type=int, default=0, help="attention heatmap PNGs for the first N rows of each format")
    m = p.add_argument_group("method")
    m.add_argument("--layer", type=int, help="decoder layer probed, 0-based (default: the middle one, n_layers // 2; "
                   "in hybrid models the attention layer nearest to it; in cross-attention models (Llama 3.2 "
                   "Vision) the cross-attention layer nearest to it)")
    m.add_argument("--max-new-tokens", type=int, default=512)
    m.add_argument("--no-noise", action="store_true", help="answer from the clean images")
    m.add_argument("--grid-noise", type=float, default=NOISE_STD["grid"], help="noise std on the grid's target cell")
    m.add_argument("--pip-noise", type=float, default=NOISE_STD["pip"], help="noise std on the whole pic-in-pic image")
    m.add_argument("--min-ppl", type=float, default=MIN_PPL, help="a rejected needs PPL above this")
    m.add_argument("--threshold", action="append", default=[], metavar="FORMAT[:N]=VALUE",
                   help="override a ratio threshold, e.g. grid:9=0.35, or grid=0.5 for every count; "
                        "FORMAT=inf for every wrong answer (repeatable)")
    m.add_argument("--probe", choices=("during-generation", "teacher-forced"), default="during-generation",
                   help="during-generation (default): the attention rows and the answer's log-probs taken while "
                        "generating, a row whose generated tokens differ from the scored ones re-run teacher-forced; "
                        "teacher-forced: a forward over prompt + answer after generating, for every row (equal to "
                        "1e-5, tested)")
    m.add_argument("--seed", type=int, default=0, help="with the row id, seeds the noise")
    s = p.add_argument_group("system")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--dtype", default="auto", choices=vlm.DTYPES)
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    common.add_max_image_tokens_flag(s)
    common.add_image_flags(s)
    common.add_threads_flag(s)
    s.add_argument("--shard", type=int, default=0, help="this process's shard (rows by a hash of their id)")
    s.add_argument("--num-shards", type=int, default=1)
    a = p.parse_args(argv)
    if not 0 <= a.shard < a.num_shards:
        p.error("--shard must be in 0..--num-shards-1")
    try:
        parse_thresholds(a.threshold)
    except ValueError as e:
        p.error(f"--threshold: {e}")
    if any(path.resolve() == Path(d).resolve() for path in output_paths(a)[:2] for d in a.data):
        p.error("--out would overwrite an input")
    return a


if __name__ == "__main__":
    common.run_stage(main, get_args)
