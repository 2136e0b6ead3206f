"""04_gen_pairs.py: the probe against eager attentions, geometry, noise, selection, the CLI and resume."""
import ast
import contextlib
import importlib
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import vlm
import token_geometry
from common import DataError

gp = importlib.import_module("04_gen_pairs")


# ---- hand-made 01-03 rows on the tiny toy world (same `mia` records as 01-03 write) ----------
def _cells(rows, cols, cell=448, gap=40):
    return [[j * (cell + gap), i * (cell + gap) + gap, j * (cell + gap) + cell, i * (cell + gap) + gap + cell]
            for i in range(rows) for j in range(cols)]


@pytest.fixture(scope="module")
def world(toy_tiny, tmp_path_factory):
    """Sequence, grid and pic-in-pic rows built by hand from the tiny toy's images."""
    toy = Path(toy_tiny) / "data" / "toy"
    root, out = toy / "images", tmp_path_factory.mktemp("rows")
    src = json.loads((toy / "train.json").read_text())
    (root / "t04").mkdir(exist_ok=True)
    label = re.compile(r"^(Image\d+:)?\s*(In Image\d+, )?")
    q = lambda r: label.sub("", r["conversations"][0]["value"].replace("<image>", "").strip())  # noqa: E731
    lower = lambda s: s[0].lower() + s[1:]  # noqa: E731
    seq, grid, pip = [], [], []
    for k, r in enumerate(src[:6]):
        n = 2 + k % 3
        paths = [src[(k + 7 * j) % len(src)]["image"] for j in range(1, n)]
        tgt = 1 + k % n
        paths.insert(tgt - 1, r["image"])
        prompt = "".join(f"Image{i}:<image>\n" for i in range(1, n + 1)) + f"In Image{tgt}, {lower(q(r))}"
        turns = [{"from": "human", "value": prompt}, r["conversations"][1]]
        seq.append({"id": f"seq-{r['id']}", "image": paths, "conversations": turns, "toy": r["toy"],
                    "mia": {"format": "sequence", "n_images": n, "target": tgt, "sources": [r["id"]]}})
    for k, r in enumerate(src[6:10]):
        layout = [(1, 2), (2, 2)][k % 2]
        cells = _cells(*layout)
        size = (cells[-1][2], cells[-1][3])
        canvas = Image.new("RGB", size, "white")
        tgt = 1 + k % len(cells)
        for c, cell in enumerate(cells):
            im = Image.open(root / (r["image"] if c == tgt - 1 else src[(k + 3 * c + 11) % len(src)]["image"])).convert("RGB")
            canvas.paste(im.resize((448, 448)), cell[:2])
        canvas.save(root / "t04" / f"grid-{k}.png")
        grid.append({"id": f"grid-{r['id']}", "image": [f"t04/grid-{k}.png"], "toy": r["toy"],
                     "conversations": [{"from": "human", "value": f"<image>\nIn Image{tgt}, {lower(q(r))}"},
                                       r["conversations"][1]],
                     "mia": {"format": "grid", "n_images": len(cells), "layout": list(layout), "target": tgt,
                             "size": list(size), "cells": cells, "pasted": cells}})
    for k, r in enumerate(src[10:14]):
        bg = Image.open(root / src[(k + 20) % len(src)]["image"]).convert("RGB").resize((128, 96))
        box = [19, 14, 109, 82]
        bg.paste(Image.open(root / r["image"]).convert("RGB").resize((90, 68)), box[:2])
        bg.save(root / "t04" / f"pip-{k}.png")
        pip.append({"id": f"pip-{r['id']}", "image": [f"t04/pip-{k}.png"], "toy": r["toy"],
                    "conversations": [{"from": "human", "value": f"<image>\nFor the image in the center, {lower(q(r))}"},
                                      r["conversations"][1]],
                    "mia": {"format": "pip", "n_images": 2, "target": 1, "size": [128, 96], "inset": box}})
    files = []
    for name, rows in (("sequence", seq), ("grid", grid), ("pip", pip)):
        common.write_jsonl(out / f"{name}.jsonl", rows)
        files.append(out / f"{name}.jsonl")
    return SimpleNamespace(root=root, files=files, model=Path(toy_tiny) / "models" / "toy-llava", out=out,
                           rows={"sequence": seq, "grid": grid, "pip": pip})


@pytest.fixture(scope="module")
def models(world):
    probe, processor = vlm.load_model(world.model)
    n_layers = gp.install_probe(probe)
    eager, _ = vlm.load_model(world.model, attn_implementation="eager")
    return SimpleNamespace(probe=probe, eager=eager, processor=processor, n_layers=n_layers)


def _items(world, names_k):
    out = []
    for name, k in names_k:
        row = world.rows[name][k]
        out.append(gp.make_item(row, "test", k + 1, len(out)))
    return out


# ---- the probe equals brute force from eager output_attentions -------------------------------
def _brute(models, batch, layer):
    """Eager forward, ALL layers' attentions kept; layer L, heads averaged, response rows averaged."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_lens")}
    with torch.no_grad():
        att = models.eager.model(**inputs, output_attentions=True).attentions[layer]  # (B, H, T, T)
    out = []
    for b in range(att.shape[0]):
        pos = (batch["labels"][b] != vlm.IGNORE_INDEX).nonzero().flatten()
        out.append(att[b].mean(0)[int(pos[0]) - 1:int(pos[-1])].mean(0).numpy())  # rows predicting response tokens
    return np.stack(out)


@pytest.mark.parametrize("layer", [None, 0])
def test_probe_matches_eager_attentions_in_padded_batch(world, models, layer):
    layer = models.n_layers // 2 if layer is None else layer
    items = _items(world, [("sequence", 1), ("grid", 0), ("sequence", 2), ("pip", 0), ("grid", 1), ("sequence", 0)])
    images = [[common.load_image(world.root, p) for p in it["image"]] for it in items]
    answers = ["red", "the shape is a blue circle on white", "", "green green green", "no", "it is gray"]
    qs = [it["prompt"] for it in items]
    boxes = [token_geometry.image_token_boxes(models.processor, ims) for ims in images]
    attn, positions, _, _ = gp.probe_forward(models.probe, models.processor, qs, images, answers, layer,
                                             [[len(b) for b in bs] for bs in boxes])
    batch = vlm.build_inputs(models.processor, qs, images, answers=answers)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 3  # a padded batch of unequal lengths
    ref = _brute(models, batch, layer)
    assert np.abs(attn - ref).max() < 1e-5
    for b, it in enumerate(items):
        ratio, masses, _ = gp.row_numbers(it, attn[b], positions[b], boxes[b])
        ratio_ref, masses_ref, _ = gp.row_numbers(it, ref[b], positions[b], boxes[b])
        assert len(masses) == len(it["image"])
        assert np.allclose(masses, masses_ref, atol=1e-5) and abs(ratio - ratio_ref) < 1e-5
        spans = vlm.image_spans(batch["input_ids"][b:b + 1], vlm.image_token_id(models.probe))[0]
        sums = [float(ref[b][s:e].sum()) for s, e in spans]  # per-image share straight from the eager rows
        assert np.allclose(masses, sums, atol=1e-5)


def test_probe_wraps_the_attention_implementation_the_model_was_loaded_with(world, models):
    """Loaded eager (as a family that needs it is: Gemma 2's softcap), the probe wraps eager, the
    model's logits are unchanged and the probe rows equal eager output_attentions."""
    eager, proc = vlm.load_model(world.model, attn_implementation="eager")
    items = _items(world, [("sequence", 1), ("grid", 0), ("sequence", 2)])
    images = [[common.load_image(world.root, p) for p in it["image"]] for it in items]
    qs, answers = [it["prompt"] for it in items], ["red", "the shape is blue", "no"]
    batch = vlm.build_inputs(proc, qs, images, answers=answers)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_lens")}
    with torch.no_grad():
        before = eager(**inputs).logits
    gp.install_probe(eager)
    assert gp._WRAPS[id(eager.config.get_text_config())] == "eager"
    with torch.no_grad():
        assert torch.equal(eager(**inputs).logits, before)
    attn, _, _, _ = gp.probe_forward(eager, proc, qs, images, answers, 1)
    assert np.abs(attn - _brute(models, batch, 1)).max() < 1e-5


def test_install_probe_names_the_probe_on_a_config_that_is_its_own_text_config():
    """A model whose config has no text sub-config (get_text_config() is the config itself) takes the
    attention implementation by name; {"text_config": ...} would set nothing there and leave the probe out."""
    class Config:
        _attn_implementation = "sdpa"

        def get_text_config(self):
            return self

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.layers, self.asked = Config(), torch.nn.ModuleList([torch.nn.Linear(2, 2)]), []

        def get_decoder(self):
            return self

        def set_attn_implementation(self, impl):
            self.asked.append(impl)

    model = Model()
    assert gp.install_probe(model) == 1 and model.asked == [gp.PROBE_NAME]


def test_allowed_keys_reads_every_mask_form_alike():
    """SDPA's bool mask, eager's additive one, flash's 2-D key padding and none (causal) -> the same keys."""
    keys = torch.tensor([[False, True, True, True]])  # one row, left-padded by one
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool)) & keys[:, None, :]  # (1, 4, 4)
    sdpa = causal[:, None]  # (1, 1, 4, 4)
    eager = torch.zeros(1, 1, 4, 4).masked_fill(~sdpa, torch.finfo(torch.float32).min)
    qpos = torch.arange(1, 4)
    for mask in (sdpa, eager, keys.long()):
        assert torch.equal(gp.allowed_keys(mask, 0, qpos, 4), causal[0, 1:4])
    assert torch.equal(gp.allowed_keys(sdpa[:, :, -1:], 0, torch.tensor([3]), 4), causal[0, 3:4])  # a decode step
    assert torch.equal(gp.allowed_keys(None, 0, qpos, 4), torch.tril(torch.ones(4, 4, dtype=torch.bool))[1:4])
    two = torch.cat([keys, torch.ones_like(keys)])  # rows at once (a decode step's batch): row 1 unpadded
    both = torch.tril(torch.ones(4, 4, dtype=torch.bool)) & two[:, None, :]  # (2, 4, 4)
    for mask in (both[:, None], torch.zeros(2, 1, 4, 4).masked_fill(~both[:, None], torch.finfo(torch.float32).min), two.long()):
        assert torch.equal(gp.allowed_keys(mask, torch.arange(2), qpos, 4), both[:, 1:4])


def test_probe_rows_apply_the_logit_softcap_as_eager_does():
    """Gemma 2: scores = tanh(scores / cap) * cap before the mask and softmax (its eager_attention_forward)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=g) * 4, torch.randn(1, 1, 5, 4, generator=g) * 4
    cap, scale = 3.0, 0.5
    scores = torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale / cap) * cap  # (1, 2, 5, 5)
    scores = scores.masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), float("-inf"))
    want = torch.softmax(scores, -1)[0, :, 2:5].mean(dim=(0, 1))
    got = gp.response_attention(q, k, None, scale, [(2, 5)], softcap=cap)[0]
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(gp.response_attention(q, k, None, scale, [(2, 5)])[0], want, atol=1e-3)


def test_cross_attention_probe_weighs_each_images_real_keys_by_hand():
    """A cross-attention layer (Llama 3.2 Vision): the keys are 2 image slots of 3 one-key tiles; image 1
    has 2 real tiles (keys 0, 1), image 2 one (key 3); keys 2, 4, 5 are padded tiles, masked for every row.
    Text row 0 precedes the images (Mllama hands such a row in all 0: every key allowed), row 1 follows
    image 1 only, row 2 both. One head, q = 1, scaling 1: scores are the keys (0, ln 3, -, ln 2, -, -).
      row 1: softmax over keys 0, 1 -> (1/4, 3/4);  row 2: over 0, 1, 3 -> (1/6, 1/2, 1/3)
      response rows 1..2: (5/24, 15/24, 0, 4/24, 0, 0); image means 10/24 and 4/24 -> target 2: 4/14.
    A causal reading would drop key 3 from row 2; a mean over image 2's whole slot would be 4/72."""
    k = torch.tensor([0.0, math.log(3), 5.0, math.log(2), 5.0, 5.0]).reshape(1, 1, 6, 1)
    q = torch.ones(1, 1, 3, 1)
    sees = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    mask = torch.zeros(1, 1, 3, 6).masked_fill(~sees, torch.finfo(torch.float32).min)  # as the layer gets it
    assert torch.equal(gp.allowed_keys(mask, 0, torch.arange(3), 6, causal=False), sees)
    got = gp.response_attention(q, k, mask, 1.0, [(1, 3)], causal=False)[0]
    assert torch.allclose(got, torch.tensor([5, 15, 0, 4, 0, 0]) / 24, atol=1e-6)
    step = gp.last_row_attention(q[:, :, 2:], k, mask[:, :, 2:], 1.0, causal=False)[0]  # a decode step: row 2 alone
    assert torch.allclose(step, torch.tensor([1 / 6, 1 / 2, 0, 1 / 3, 0, 0]), atol=1e-6)
    (positions,) = gp.image_keys(6, [[2, 1]])
    assert [p.tolist() for p in positions] == [[0, 1], [3]]
    maps = [got.numpy()[p] for p in positions]
    assert gp.attention_ratio("sequence", maps, 2) == pytest.approx(4 / 14)
    with pytest.raises(ValueError, match="6 keys"):
        gp.image_keys(6, [[4, 1]])  # an image larger than its slot

def test_probe_single_unpadded_row_uses_causal_mask(world, models):
    """One row: the mask builder may skip the mask (pure causal); the probe must rebuild it."""
    it = _items(world, [("sequence", 2)])
    images = [[common.load_image(world.root, p) for p in it[0]["image"]]]
    attn, _, _, _ = gp.probe_forward(models.probe, models.processor, [it[0]["prompt"]], images, ["blue"], 1)
    batch = vlm.build_inputs(models.processor, [it[0]["prompt"]], images, answers=["blue"])
    assert np.abs(attn - _brute(models, batch, 1)).max() < 1e-5


def test_probe_leaves_the_model_output_unchanged(world, models):
    it = _items(world, [("pip", 1), ("sequence", 3)])
    images = [[common.load_image(world.root, p) for p in x["image"]] for x in it]
    qs = [x["prompt"] for x in it]
    _, _, lp, n = gp.probe_forward(models.probe, models.processor, qs, images, ["red", "a b"], 1)
    with torch.no_grad():
        ref = vlm.response_logps(models.eager, vlm.build_inputs(models.processor, qs, images, answers=["red", "a b"]))
    assert np.allclose(lp, ref[0].numpy(), atol=1e-4) and n == ref[2].tolist()


@pytest.fixture(scope="module")
def llava_shaped(world, tmp_path_factory):
    """A model with llava-1.5-7b-hf's image geometry (shortest edge 336, centre crop 336, patch 14 ->
    576 tokens per image), random weights, the tiny toy's tokenizer, template and text config."""
    from transformers import (AutoConfig, AutoProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = tmp_path_factory.mktemp("llava-shaped")
    toy_proc, toy_cfg = AutoProcessor.from_pretrained(world.model), AutoConfig.from_pretrained(world.model)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True)
    LlavaProcessor(image_processor=ip, tokenizer=toy_proc.tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=toy_proc.chat_template).save_pretrained(out)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    cfg = LlavaConfig(vision_config=vision, text_config=toy_cfg.text_config, image_token_index=vlm.image_token_id(toy_cfg),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    return out


def test_llava15_geometry_probe_and_stage_unchanged(world, llava_shaped, tmp_path):
    """Same code on 576 tokens/image with a centre crop: probe == eager, and the stage runs end to end."""
    model, processor = vlm.load_model(llava_shaped)
    gp.install_probe(model)
    eager, _ = vlm.load_model(llava_shaped, attn_implementation="eager")
    items = _items(world, [("grid", 0), ("sequence", 1), ("pip", 1)])
    images = [[common.load_image(world.root, p) for p in it["image"]] for it in items]
    qs, answers = [it["prompt"] for it in items], ["a b c", "red", ""]
    boxes = [token_geometry.image_token_boxes(processor, ims) for ims in images]
    attn, positions, _, _ = gp.probe_forward(model, processor, qs, images, answers, 1, [[len(b) for b in bs] for bs in boxes])
    assert [[len(p) for p in ps] for ps in positions] == [[576], [576] * 3, [576]]
    ref = _brute(SimpleNamespace(eager=eager), vlm.build_inputs(processor, qs, images, answers=answers), 1)
    assert np.abs(attn - ref).max() < 1e-5
    ratio, _, maps = gp.row_numbers(items[0], attn[0], positions[0], boxes[0])
    w = gp.box_weights(boxes[0][0], items[0]["mia"]["cells"][items[0]["target"] - 1])
    assert maps[0].shape == (576,) and math.isclose(ratio, float((maps[0] * w).sum() / maps[0].sum()))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pairs, cands = gp.main(gp.get_args([*_argv(world, tmp_path / "pairs.jsonl"), "--model", str(llava_shaped),
                                            "--limit", "2", "--max-new-tokens", "3", "--viz", "0"]))
    assert len(cands) == 6 and all(c["ppl"] for c in cands) and {c["format"] for c in cands} == {"sequence", "grid", "pip"}


# ---- geometry: a grid cell or inset -> each visual token's share of it ---------------------
def test_box_weights_hand_case(world):
    """The toy squashes any image to 64x64 and cuts 8-px patches: a 936x488 collage's tokens see
    936/8 x 488/8 original pixels each; the 1x2 collage's left cell (0, 40, 448, 488) covers three
    columns, 0.83 of the 4th (448 px = 30.63 processed px), and 0.34 of the top row (the label strip)."""
    proc = vlm.load_processor(world.model)
    (boxes,) = token_geometry.image_token_boxes(proc, [Image.new("RGB", (936, 488))])
    w = gp.box_weights(boxes, (0, 40, 448, 488)).reshape(8, 8)
    x1 = 448 * 64 / 936
    assert np.allclose(w[3, :], [1, 1, 1, (x1 - 24) / 8, 0, 0, 0, 0])
    assert np.allclose(w[:, 0], [(8 - 40 * 64 / 488) / 8] + [1] * 7)
    assert gp.box_weights(boxes, (0, 0, 936, 488)).sum() == 64
    assert gp.box_weights(np.full((2, 4), np.nan), (0, 0, 9, 9)).tolist() == [0, 0]  # newline tokens see nothing


@pytest.mark.parametrize("kind,size,box", [
    ("toy", (936, 976), (488, 528, 936, 976)),  # 2x2 grid, cell 4
    ("llava15", (936, 488), (488, 40, 936, 488)),  # 1x2 grid, cell 2, centre-cropped
    ("llava15", (640, 480), (96, 72, 544, 408)),  # pic-in-pic inset
    ("pad", (936, 488), (488, 40, 936, 488)),  # LLaVA pad-to-square
])
def test_box_weights_match_the_real_image_processor(world, kind, size, box):
    """Paint the box white on black, run transformers' image processor, compare per-patch brightness
    with each token's share of the box (token_geometry.image_token_boxes + box_weights)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    patch = {"toy": 8, "llava15": 14, "pad": 14}[kind]
    if kind == "toy":
        ip = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False, do_normalize=False)
    elif kind == "llava15":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, do_center_crop=True, crop_size={"height": 336, "width": 336},
                                   do_normalize=False)
    else:
        ip = LlavaImageProcessorPil(do_pad=True, image_mean=[0, 0, 0], size={"height": 336, "width": 336},
                                    do_center_crop=False, do_normalize=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=vlm.load_processor(world.model).tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    im = Image.new("RGB", size, "black")
    im.paste((255, 255, 255), box)
    px = ip(images=[im], return_tensors="pt")["pixel_values"][0, 0].numpy()  # (H, W) in [0, 1]
    gh, gw = px.shape[0] // patch, px.shape[1] // patch
    bright = px[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch).mean(axis=(1, 3))
    (boxes,) = token_geometry.image_token_boxes(proc, [im])
    w = gp.box_weights(boxes, box).reshape(gh, gw)
    assert np.abs(w - bright).max() < 0.12  # resampling blurs the edges a little
    assert abs(w.sum() - bright.sum()) / w.sum() < 0.02


# ---- pure method functions -------------------------------------------------------------------
def test_attention_ratio_per_format():
    maps = [np.full((2, 2), 0.1), np.full((2, 2), 0.3)]
    assert math.isclose(gp.attention_ratio("sequence", maps, 2), 0.75)
    m = np.arange(16, dtype=float).reshape(4, 4)
    w = np.zeros((4, 4))
    w[:2, :2] = 1  # top-left block of a 2x2 grid
    assert math.isclose(gp.attention_ratio("grid", [m], 1, w), (0 + 1 + 4 + 5) / 120)
    w[2:, :2] = 0.5
    assert math.isclose(gp.attention_ratio("pip", [m], 1, w), (10 + 0.5 * (8 + 9 + 12 + 13)) / 120)


def test_perplexity_hand_case():
    assert math.isclose(gp.perplexity(2 * -math.log(2), 2), 2.0)
    assert gp.perplexity(0.0, 3) == 1.0 and gp.perplexity(0.0, 0) == math.inf


@pytest.mark.parametrize("fmt,n,ratio,answer,ppl,want", [
    ("sequence", 2, 0.8, "red", 1.5, "selected"),  # sequence: <= is inclusive
    ("sequence", 2, 0.81, "red", 1.5, "attention ratio above threshold"),
    ("sequence", 3, 0.7, "red", 1.5, "selected"),
    ("sequence", 5, 0.61, "red", 1.5, "attention ratio above threshold"),
    ("grid", 2, 0.7, "red", 1.5, "attention ratio above threshold"),  # grid: strict <
    ("grid", 2, 0.69, "red", 1.5, "selected"),
    ("grid", 9, 0.29, "red", 1.5, "selected"),
    ("grid", 6, 0.4, "red", 1.5, "attention ratio above threshold"),
    ("pip", 2, 0.79, "red", 1.5, "selected"),
    ("pip", 2, 0.8, "red", 1.5, "attention ratio above threshold"),
    ("sequence", 2, 0.1, " BLUE\n", 1.5, "answer equals ground truth"),
    ("sequence", 2, 0.1, "  ", 1.5, "empty answer"),
    ("sequence", 2, 0.1, "red", 1.1, "ppl not above minimum"),  # PPL must be > 1.1
    ("sequence", 7, 0.1, "red", 1.5, "no threshold for this format and image count"),
])
def test_selection_table(fmt, n, ratio, answer, ppl, want):
    limit = gp.threshold_for(fmt, n)
    assert gp.select(answer, "blue", ppl, ratio, limit, gp.INCLUSIVE[fmt]) == want


def test_selection_truncated_and_overrides():
    assert gp.select("red", "blue", 2.0, 0.1, 0.8, True, truncated=True) == "answer truncated at --max-new-tokens"
    table = gp.parse_thresholds(["grid:9=0.35", "pip=0.7"])
    assert gp.threshold_for("grid", 9, table) == 0.35 and gp.threshold_for("pip", 2, table) == 0.7
    assert gp.threshold_for("grid", 9) == 0.3  # the module table is not modified
    table = gp.parse_thresholds(["sequence=inf", "grid=0.5", "grid:9=0.1"])  # a whole format, then one count
    assert [gp.threshold_for("sequence", n, table) for n in (2, 5)] == [float("inf")] * 2
    assert (gp.threshold_for("grid", 2, table), gp.threshold_for("grid", 9, table)) == (0.5, 0.1)
    assert gp.select("red", "blue", 1.5, 0.99, float("inf"), False) == "selected"
    with pytest.raises(ValueError):
        gp.parse_thresholds(["collage:2=0.5"])


def test_noise_lands_only_in_the_target_cell(world):
    rng = np.random.default_rng(0)
    px = np.full((976, 936, 3), 250, np.uint8)
    box = (488, 528, 936, 976)
    out = gp.add_noise(px, box, 225.0, rng)
    inside = np.zeros(px.shape[:2], bool)
    inside[528:976, 488:936] = True
    assert (out[~inside] == 250).all()
    assert (out[inside] != 250).mean() > 0.9
    assert out[inside].mean() > 140  # clipped, not wrapped: uint8 wrap-around would pull it far below
    bright = gp.add_noise(np.full((50, 50, 3), 250, np.uint8), None, 49.0, np.random.default_rng(1))
    assert (bright < 100).mean() < 0.01  # wrap-around would put ~45% of pixels below 100
    # through the stage's own path: a grid row's target cell only, deterministic per (seed, id)
    it = gp.make_item(world.rows["grid"][1], "test", 1, 0)  # 2x2, target 2
    im = common.load_image(world.root, it["image"][0])
    args = SimpleNamespace(no_noise=False, grid_noise=225.0, pip_noise=49.0, seed=0)
    (noisy,), std = gp.corrupt(it, [im], args)
    diff = np.abs(np.asarray(noisy, int) - np.asarray(im, int)).sum(-1) > 0
    x0, y0, x1, y1 = it["mia"]["cells"][it["target"] - 1]
    assert std == 225.0 and diff[y0:y1, x0:x1].mean() > 0.9 and diff.sum() == diff[y0:y1, x0:x1].sum()
    assert np.array_equal(np.asarray(gp.corrupt(it, [im], args)[0][0]), np.asarray(noisy))
    args.no_noise = True
    assert gp.corrupt(it, [im], args) == ([im], 0.0)


def test_make_item_names_missing_fields(world):
    row = json.loads(json.dumps(world.rows["grid"][0]))
    del row["mia"]["cells"]
    with pytest.raises(DataError, match="mia.cells"):
        gp.make_item(row, "g.jsonl", 3, 0)
    row = json.loads(json.dumps(world.rows["pip"][0]))
    row["mia"]["format"] = "collage"
    with pytest.raises(DataError, match="mia.format"):
        gp.make_item(row, "p.jsonl", 1, 0)
    row = json.loads(json.dumps(world.rows["sequence"][0]))
    row["mia"]["target"] = 9
    with pytest.raises(DataError, match="mia.target"):
        gp.make_item(row, "s.jsonl", 1, 0)
    with pytest.raises(DataError, match="mia"):
        gp.make_item({k: v for k, v in world.rows["pip"][0].items() if k != "mia"}, "p.jsonl", 1, 0)


def test_shards_partition_the_rows(world):
    ids = []
    for s in range(3):
        a = gp.get_args(["--data", *map(str, world.files), "--shard", str(s), "--num-shards", "3",
                         "--out", str(world.out / "p.jsonl")])
        assert gp.output_paths(a)[0].name == f"p-{s:02d}-of-03.jsonl"
        ids += [it["id"] for it in gp.load_items(a)]
    every = [it["id"] for it in gp.load_items(gp.get_args(["--data", *map(str, world.files)]))]
    assert sorted(ids) == sorted(every) and len(set(ids)) == len(ids) == 14


# ---- the stage end to end: smoke run, reference log-probs, resume after a real kill (command line) -------------------
def _argv(world, out):
    return ["--data", *map(str, world.files), "--image-root", str(world.root), "--model", str(world.model),
            "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6", "--viz", "1"]


def _in_process(world, out):
    """main() in this process: the same code path as the command line, without paying the imports again."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gp.main(gp.get_args(_argv(world, out)))
    return buf.getvalue()


@pytest.fixture(scope="module")
def full_run(world):
    out = world.out / "full" / "pairs.jsonl"
    return out, _in_process(world, out)


def test_cli_writes_pairs_candidates_and_sidecars(world, full_run):
    out, stdout = full_run
    cands = [json.loads(x) for x in out.with_name("pairs.candidates.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [c["id"] for c in cands] == [r["id"] for f in ("sequence", "grid", "pip") for r in world.rows[f]]  # input order
    assert all({"ratio", "attn_images", "ppl", "answer", "reason", "selected"} <= set(c) for c in cands)
    assert [p["id"] for p in pairs] == [c["id"] for c in cands if c["selected"]] and pairs
    assert {p["mia"]["format"] for p in pairs} == {"sequence", "grid", "pip"}  # the barely trained tiny model errs often
    src = {r["id"]: r for f in world.rows.values() for r in f}
    for p in pairs:
        s = src[p["id"]]
        assert p["prompt"] == s["conversations"][0]["value"] and p["chosen"] == s["conversations"][1]["value"]
        assert p["image"] == s["image"] and p["mia"] == s["mia"] and p["toy"] == s["toy"] and "conversations" not in p
        assert common.normalise_answer(p["rejected"]) != common.normalise_answer(p["chosen"]) and p["probe"]["ppl"] > 1.1
        assert p["ref_model"]["path"] == str(world.model) and len(p["ref_model"]["fingerprint"]) == 16
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["counts"]["pairs"] == len(pairs) and set(meta["counts"]["by_format"]) == {"sequence", "grid", "pip"}
    assert "yield" in stdout and not Path(str(out.with_name("pairs.candidates.jsonl")) + ".partial").exists()
    assert len(list(out.with_name("pairs.viz").glob("*.png"))) == 3  # --viz 1: one per format


def test_stored_reference_logps_equal_what_the_trainer_computes(world, models, full_run):
    pairs = [json.loads(x) for x in full_run[0].read_text().splitlines()]
    assert pairs[0]["ref_model"]["fingerprint"] == vlm.model_fingerprint(models.probe)
    for p in pairs[:4] + pairs[-2:]:  # sequence ... pip; clean images, chosen + rejected in one forward
        ims = [common.load_image(world.root, x) for x in p["image"]]
        batch = vlm.build_inputs(models.processor, [p["prompt"]] * 2, [ims, ims], answers=[p["chosen"], p["rejected"]])
        with torch.no_grad():
            lp = vlm.response_logps(models.eager, batch)[0].tolist()
        assert abs(lp[0] - p["ref_chosen_logps"]) < 1e-4 and abs(lp[1] - p["ref_rejected_logps"]) < 1e-4


@pytest.mark.slow
def test_resume_after_kill_gives_identical_output(world, full_run, monkeypatch):
    """Stopped after two batches (what a kill leaves: their records flushed, nothing else), plus a
    torn last line; the rerun finishes the rest and writes the uninterrupted run's bytes."""
    out = world.out / "resumed" / "pairs.jsonl"
    partial = Path(str(out.with_name("pairs.candidates.jsonl")) + ".partial")
    real, calls = gp.run_batch, []

    def dies_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(gp, "run_batch", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _in_process(world, out)
    monkeypatch.setattr(gp, "run_batch", real)
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 6  # header + 2 batches of 3
    with open(partial, "a") as f:
        f.write('{"i": 9, "candidate": {"id": "torn')  # and a write the kill interrupted
    assert "04_gen_pairs" in _in_process(world, out)
    for name in ("pairs.jsonl", "pairs.candidates.jsonl"):
        assert (out.parent / name).read_bytes() == (full_run[0].parent / name).read_bytes()
    assert not partial.exists()
    other = world.out / "other" / "pairs.jsonl"  # a partial left by other settings is refused, not mixed in
    other.parent.mkdir()
    Path(str(other.with_name("pairs.candidates.jsonl")) + ".partial").write_text('{"resume": {"seed": 99}}\n')
    with pytest.raises(SystemExit, match="other inputs or settings"):
        _in_process(world, other)


def test_summarise_selection_precision_and_recall_hand_case():
    c = lambda fmt, ok, ratio, thr, sel=False: {"format": fmt, "correct": ok, "ratio": ratio, "threshold": thr, "selected": sel}  # noqa: E731
    cands = [c("sequence", False, 0.8, 0.8, True),  # sequence limits are inclusive: flagged, wrong
             c("sequence", False, 0.9, 0.8),        # wrong, not flagged
             c("sequence", True, 0.3, 0.8),         # right but flagged
             c("sequence", True, 0.95, 0.8),
             c("pip", False, 0.8, 0.8),             # pic-in-pic limits are strict: not flagged
             {"format": "pip", "correct": False, "selected": False}]  # no ratio (unreadable image): not counted
    t = gp.summarise(cands)
    assert (t["sequence"]["precision"], t["sequence"]["recall"]) == (0.5, 0.5)
    assert (t["sequence"]["mean_ratio_right"], t["sequence"]["mean_ratio_wrong"]) == (0.625, 0.85)
    assert (t["pip"]["precision"], t["pip"]["recall"], t["pip"]["prompts"], t["pip"]["wrong"]) == (None, 0.0, 2, 1)


# ---- --probe during-generation: the numbers taken while generating equal the teacher-forced ones ----------------
def test_response_ids_are_the_tokens_build_inputs_labels(world, models):
    items = _items(world, [("sequence", 1), ("grid", 0), ("pip", 0)])
    images = [[common.load_image(world.root, p) for p in it["image"]] for it in items]
    qs, answers = [it["prompt"] for it in items], ["red", "", "the shape is a blue circle"]
    labels = vlm.build_inputs(models.processor, qs, images, answers=answers)["labels"]
    assert vlm.response_ids(models.processor, qs, answers) == [[t for t in row.tolist() if t != vlm.IGNORE_INDEX]
                                                               for row in labels]


@pytest.mark.parametrize("layer", [None, 0])
def test_probe_during_generation_equals_teacher_forced(world, models, layer):
    """A padded batch of every format, noisy images as 04 answers from: generation's attention rows,
    log-probs and token counts == probe_forward's over the generated answers, to 1e-5."""
    layer = models.n_layers // 2 if layer is None else layer
    items = _items(world, [("sequence", 1), ("grid", 0), ("sequence", 2), ("pip", 0), ("grid", 1), ("sequence", 0)])
    args = gp.get_args(["--data", *map(str, world.files)])
    seen = [gp.corrupt(it, [common.load_image(world.root, p) for p in it["image"]], args)[0] for it in items]
    qs = [it["prompt"] for it in items]
    boxes = [token_geometry.image_token_boxes(models.processor, ims) for ims in seen]
    counts = [[len(b) for b in bs] for bs in boxes]
    answers, finished, attn, positions, lp, n, exact, _ = gp.generate_and_probe(models.probe, models.processor, qs, seen,
                                                                                24, layer, counts)
    assert (answers, finished) == vlm.generate(models.probe, models.processor, qs, seen, 24, return_finished=True)
    # exact: the generated tokens are the scored ones; the tiny toy also answers e.g. "r","o" where " ro" is
    # scored as "Ġ","r","o" (no leading space token): such rows are 04's teacher-forced fallback
    assert sum(exact) >= 4
    attn_t, pos_t, lp_t, n_t = gp.probe_forward(models.probe, models.processor, qs, seen, answers, layer, counts)
    ex = np.array(exact)
    assert np.array(n)[ex].tolist() == np.array(n_t)[ex].tolist()
    assert np.allclose(np.array(lp)[ex], np.array(lp_t)[ex], atol=1e-5, rtol=0)
    for b, it in enumerate(items):
        if not exact[b]:
            continue
        maps = [attn[b][p] for p in positions[b]]
        maps_t = [attn_t[b][p] for p in pos_t[b]]
        assert all(np.abs(m - m_t).max() < 1e-5 for m, m_t in zip(maps, maps_t))
        ratio = gp.row_numbers(it, attn[b], positions[b], boxes[b])[0]
        assert abs(ratio - gp.row_numbers(it, attn_t[b], pos_t[b], boxes[b])[0]) < 1e-5
        # ppl = exp(-mean log p): the log-probs' float error (~5e-7) grows with it; 1e-5 relative
        assert math.isclose(gp.perplexity(lp[b], n[b]), gp.perplexity(lp_t[b], n_t[b]), rel_tol=1e-5)


def test_probe_during_generation_cli_equals_teacher_forced(world, full_run):
    """The stage as it runs by default (--probe during-generation) against --probe teacher-forced: the
    same answers, selections and reasons; every number (ratio, attention masses, ppl, reference
    log-probs) to 1e-5. Rows cut at --max-new-tokens (no stop token generated) fall back to
    teacher-forced, and the log says so."""
    assert gp.get_args([]).probe == "during-generation"
    used = ast.literal_eval(re.search(r"--probe during-generation: (\{.*?\})", full_run[1]).group(1))
    assert used["during"] >= 7 and used["during"] + used["teacher_forced"] == 14 and used["ref_chosen_cached"] >= 1
    out = world.out / "teacher-forced" / "pairs.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        gp.main(gp.get_args([*_argv(world, out), "--probe", "teacher-forced"]))
    for name in ("pairs.candidates.jsonl", "pairs.jsonl"):
        got = [json.loads(x) for x in full_run[0].with_name(name).read_text().splitlines()]
        want = [json.loads(x) for x in out.with_name(name).read_text().splitlines()]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            g, w = {**g, **g.get("probe", {})}, {**w, **w.get("probe", {})}
            for k in w:
                if k in ("ratio", "ref_chosen_logps", "ref_rejected_logps"):
                    assert abs(g[k] - w[k]) <= 1e-5 + 1e-6, (w["id"], k)  # + 1e-6: both are rounded to 6 places
                elif k == "ppl" and w[k] is not None:
                    assert math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-6), w["id"]
                elif k == "attn_images":
                    assert np.allclose(g[k], w[k], atol=1e-5 + 1e-6, rtol=0)
                elif k not in ("probe", "viz"):
                    assert g[k] == w[k], (w["id"], k)


def test_chosen_scored_from_the_prompt_cache_equals_teacher_forced(world, models):
    """--probe during-generation scores a pair's chosen answer from generation's KV cache of the prompt
    (vlm.score_after_prompt): a left-padded batch of 2-4 image prompts, rows picked out of order and
    one row twice (two answers), equal to the teacher-forced forward 04 runs otherwise (1e-5)."""
    items = _items(world, [("sequence", k) for k in range(6)])
    qs = [it["prompt"] for it in items]
    images = [[common.load_image(world.root, p) for p in it["image"]] for it in items]
    with torch.no_grad():
        g = vlm.generate_scored(models.probe, models.processor, qs, images, 8, keep_prompt=True)
    assert g["prompt"] is not None and len({len(ims) for ims in images}) == 3  # prompts of 3 lengths: padding
    rows, answers = [4, 1, 1, 2], [items[4]["truth"], items[1]["truth"], "a blue circle", items[2]["truth"]]
    got = vlm.score_after_prompt(models.probe, g["prompt"], rows, vlm.response_ids(models.processor,
                                                                                    [qs[b] for b in rows], answers))
    batch = vlm.build_inputs(models.processor, [qs[b] for b in rows], [images[b] for b in rows], answers=answers)
    with torch.no_grad():
        want = vlm.response_logps(models.eager, batch)[0].tolist()
    assert np.allclose(got, want, atol=1e-5, rtol=0), (got, want)
