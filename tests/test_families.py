"""Every VLM family of tests/tiny_families.py through stages 04, 06 and common.py, offline.

- loading: each tiny checkpoint loads through vlm.load_model as its family's real model /
  processor / image-processor classes, also without torchvision; a two-image prompt expands into
  exactly the visual tokens the model's vision side produces;
- prompts: each family's template decides how an image item is written (its wrappers), where the
  answer turn starts and which token ends it; render_prompt / render_pair / build_inputs follow it;
  image_positions gives each image its tokens (Idefics3's tiles are several runs);
- 04: the probe equals eager attentions at a softmax-attention layer (Llama 3.2 Vision: a
  cross-attention layer, over the images' features); every format gets a ratio through the
  family's views; the stored reference equals 06's plain forward;
- 06: LoRA on the decoder only; the fast path equals the plain path where fast_path_blocker lets
  it run, the family's reason otherwise; the command line trains, merges and saves (slow).
"""
import ast
import contextlib
import importlib
import inspect
import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import prefix_sharing
import train_state
import vlm
import token_geometry
from tiny_families import (CROSS_ATTENTION, FAMILIES, FAMILIES_SPEC, NO_GEOMETRY, NO_TEMPLATE, build, tiny_dirs,  # noqa: F401
                           write_mia_rows)

SPEC = {f.name: f for f in FAMILIES_SPEC}
QUESTION = "Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape?"
# two images of different aspect, small: 64x48 and 40x64 (w x h)
IMAGES = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 64), (30, 30, 200))]
# visual tokens the two IMAGES become, per family (= the vision side's feature count, checked below)
IMAGE_TOKENS = {
    "llava": [4, 4],  # (32/16)^2, CLS dropped
    "llava_next": [24, 16],  # anyres: base 2x2 + unpadded grid of 2x2 tiles + one newline per row
    "llava_onevision": [5, 5],  # several images: base view only, 2x2 + one newline
    "qwen2_vl": [4, 2], "qwen2_5_vl": [4, 2],  # smart_resize to 56x56 / 56x28, 14-px patches, 2x2 merge
    "qwen3_vl": [4, 2], "qwen3_5": [4, 2],  # the same with 16-px patches: 64x64 / 64x32
    "internvl": [52, 28],  # (12 / 6 tiles + thumbnail) x 4 tokens, between <img> ... </img>
    "gemma3": [4, 4],  # 8x8 patches average-pooled 4x4
    "gemma4": [63, 60],  # resized to fill 70 soft tokens after 3x3 pooling, rounded down per side
    "idefics3": [20, 20], "smolvlm": [20, 20],  # 2x2 tiles + global view, 4 tokens each
    "qwen3_vl_moe": [4, 2], "glm4v": [4, 2],  # Qwen's smart resize and 2x2 merge
    "aya_vision": [52, 28],  # GOT-OCR2 tiles (12 / 6 + thumbnail) x 4 tokens after the pixel shuffle
    "paligemma2": [4, 4],  # SigLIP: squashed to 32x32, 16-px patches
    "lfm2_vl": [24, 2],  # tiles of 4 tokens + one per image (no thumbnail) / smart resize
    "mistral3": [9, 6],  # Pixtral: 3x3 / 3x2 merged patches, rows split by [IMG_BREAK] (text)
    "llama4": [20, 20],  # <|patch|> x (2x2 tiles + global view) x 4, the processor's <|image|> a wrapper
    "mllama": [1, 1],  # one <|image|> each: the features reach the text through cross-attention (CROSS_KEYS)
}
# a cross-attention family's visual tokens: the keys of its cross-attention layers, per image
CROSS_KEYS = {"mllama": [20, 20]}  # 2x2 tiles of 32 px each, CLS + (32/16)^2 patches per tile
FAMILY = pytest.mark.parametrize("family", FAMILIES)


def _torchvision_imports():
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError):
        return False
    return True


@pytest.fixture(scope="session")
def loaded(tiny_dirs):  # noqa: F811
    """loaded(family) -> (model, processor), through vlm.load_model, once per session."""
    cache = {}

    def get(family):
        if family == "smolvlm":  # SmolVLMProcessor refuses to start without it (a small pure-Python package)
            pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (requirements: num2words)")
        if family not in cache:
            cache[family] = vlm.load_model(tiny_dirs(family), dtype="float32")
        return cache[family]

    return get


def _template_prompt(proc):
    """The question as the family's template renders an interleaved message: text, image, text, ...;
    without a template, vlm.FALLBACK_TEMPLATE around it with the processor's image token in place."""
    if proc.chat_template is None:
        return vlm.FALLBACK_TEMPLATE.format(question=QUESTION.replace("<image>", proc.image_token))
    parts, content = QUESTION.split("<image>"), []
    for i, text in enumerate(parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(parts) - 1:
            content.append({"type": "image"})
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def _feature_counts(model, enc):
    """Per image (or per tile batch) visual-feature counts from the model's own vision side."""
    params = inspect.signature(model.get_image_features).parameters  # every family's top class has it (Llama 4: no .model)
    with torch.no_grad():
        out = model.get_image_features(**{k: v for k, v in enc.items() if k in params})
    feats = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return [f.numel() // f.shape[-1] for f in feats]


def _cross_keys(model, enc):
    """Per image, the keys a cross-attention family's vision model gives its text (Mllama: real tiles,
    aspect_ratio_mask, x features per tile, CLS included), one prompt."""
    with torch.no_grad():
        feats = model.model.vision_model(pixel_values=enc["pixel_values"], aspect_ratio_ids=enc["aspect_ratio_ids"],
                                         aspect_ratio_mask=enc["aspect_ratio_mask"]).last_hidden_state
    return (enc["aspect_ratio_mask"][0].sum(-1) * feats.shape[3]).tolist()  # feats (B, images, tiles, per tile, D)


# ---- what holds ----------------------------------------------------------------------------
@FAMILY
def test_loads_offline_as_the_families_real_classes(family, loaded):
    model, proc = loaded(family)
    spec = SPEC[family]
    assert type(model).__name__ == spec.model_class
    assert type(proc).__name__ == spec.processor_class
    want_ip = spec.image_processor_class if not _torchvision_imports() else spec.image_processor_class.removesuffix("Pil")
    assert type(proc.image_processor).__name__ == want_ip
    assert proc.chat_template is None if family in NO_TEMPLATE else "{%" in proc.chat_template
    assert model.generation_config.eos_token_id is not None
    if "video_processor" in type(proc).get_attributes() and not _torchvision_imports():
        # the video part needs torchvision: its saved settings stand in, and videos are refused
        assert proc.video_processor["video_processor_type"].endswith("VideoProcessor")
        with pytest.raises(RuntimeError, match="torchvision"):
            proc.video_processor([torch.zeros(2, 3, 32, 32)])


@FAMILY
def test_a_two_image_prompt_expands_into_the_tokens_the_model_expects(family, loaded):
    """The template renders both image items, the processor expands each placeholder, and the
    number of image-token positions equals the vision side's feature count (a cross-attention
    family: one token per image, and the features are its keys); then a forward."""
    model, proc = loaded(family)
    enc = vlm.to_model(proc(text=[_template_prompt(proc)], images=[IMAGES], return_tensors="pt"), model)  # Llama 4: bfloat16 pixels
    n_tokens = int((enc["input_ids"] == vlm.image_token_id(model)).sum())
    assert n_tokens == sum(IMAGE_TOKENS[family])
    if family in CROSS_ATTENTION:
        assert _cross_keys(model, enc) == CROSS_KEYS[family]
    else:
        assert sum(_feature_counts(model, enc)) == n_tokens
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()


def test_load_processor_without_torchvision_saves_and_reloads_the_video_settings(tiny_dirs, tmp_path, monkeypatch):  # noqa: F811
    """Where torchvision does not import, a video family's processor is the real class with the PIL
    image processor and its video settings only; save_pretrained writes them back, so the folder
    still loads on a torchvision machine. The CPU lane has no torchvision; the GPU-user lane has one,
    so there vlm is told it fails (a build that installs but does not match torch: the fallback's
    other branch), and the saved folder is loaded back as a torchvision machine loads it."""
    torchvision_here = _torchvision_imports()
    if torchvision_here:
        monkeypatch.setitem(vlm._TORCHVISION, "problem", "RuntimeError: simulated: torchvision does not match torch")
    proc = vlm.load_processor(tiny_dirs("qwen2_5_vl"))
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    with pytest.raises(RuntimeError, match="torchvision"):
        proc.video_processor([torch.zeros(2, 3, 32, 32)])
    proc.save_pretrained(tmp_path)
    again = vlm.load_processor(tmp_path)
    assert type(again).__name__ == "Qwen2_5_VLProcessor"
    assert dict(again.video_processor) == dict(proc.video_processor)
    assert again.video_processor.merge_size == 2  # settings read as attributes, as the processor reads them
    a = proc(text=["<|image_pad|>"], images=[IMAGES[0]], return_tensors="pt")
    b = again(text=["<|image_pad|>"], images=[IMAGES[0]], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    if torchvision_here:  # the saved folder on a machine where torchvision works: the real video processor
        monkeypatch.undo()
        real = vlm.load_processor(tmp_path)
        assert type(real.video_processor).__name__ == "Qwen2VLVideoProcessor"
        for k in ("merge_size", "patch_size", "temporal_patch_size"):
            assert getattr(real.video_processor, k) == proc.video_processor[k], k
        c = real(text=["<|image_pad|>"], images=[IMAGES[0]], return_tensors="pt")
        assert torch.equal(c["input_ids"], a["input_ids"])


def test_load_processor_without_torchvision_builds_pixtral_as_autoprocessor_does(tmp_path, monkeypatch):
    """PixtralProcessor (Mistral 3) is gated on torchvision in transformers 5.23, its image processor
    has a PIL class: without torchvision, load_processor builds the real class from its parts. The
    CPU lane gets a dummy from transformers and takes that path; the GPU-user lane is told torchvision
    fails (as above) and compares with AutoProcessor, i.e. the torchvision image processor: input_ids
    and image_sizes equal, pixel_values within one uint8 level, where PIL's and torchvision's bicubic
    resizes round apart (max |difference| 1.2e-7 on the two solid images, 0.0150 = one level on the
    noise ones). The size helper the processor's module imports from the torchvision image
    processor's module is the real function: its token counts are the processor's own expansion."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    torchvision_here = _torchvision_imports()
    path = build("mistral3", tmp_path)  # not tiny_dirs: it would skip, not fail, where loading is refused
    if torchvision_here:
        monkeypatch.setitem(vlm._TORCHVISION, "problem", "RuntimeError: simulated: torchvision does not match torch")
    else:  # the path under test: transformers hands out a dummy class here
        assert processor_class_from_name("PixtralProcessor").is_dummy
    proc = vlm.load_processor(path)
    assert (type(proc).__name__, type(proc.image_processor).__name__) == ("PixtralProcessor", "PixtralImageProcessorPil")
    assert _torchvision_imports() == torchvision_here  # the stand-in used for its import is gone
    rng = np.random.default_rng(0)
    images = IMAGES + [Image.fromarray(rng.integers(0, 256, (im.height, im.width, 3), dtype=np.uint8)) for im in IMAGES]
    text = ["[IMG]" * len(images) + " What is shown?"]
    enc = proc(text=text, images=[images], return_tensors="pt")
    sizes = [(im.height, im.width) for im in images]
    expansion = torch.isin(enc["input_ids"], torch.tensor(proc.image_token_ids)).sum()
    assert sum(proc._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens) == expansion == 2 * (12 + 9)
    if torchvision_here:
        auto = AutoProcessor.from_pretrained(path, local_files_only=True)
        assert type(auto.image_processor).__name__ == "PixtralImageProcessor"  # its torchvision class
        want = auto(text=text, images=[images], return_tensors="pt")
        assert want.keys() == enc.keys()
        assert torch.equal(want["input_ids"], enc["input_ids"]) and torch.equal(want["image_sizes"], enc["image_sizes"])
        one_level = 1 / 255 / min(proc.image_processor.image_std)  # in normalised units
        assert (want["pixel_values"] - enc["pixel_values"]).abs().max() <= one_level + 1e-6


@pytest.mark.parametrize("family", ["llama4", "lfm2_vl"])
def test_load_processor_without_torchvision_refuses_an_image_processor_with_no_pil_class(family, tmp_path, monkeypatch):
    """Llama 4's and LFM2-VL's image processors are torchvision classes only (transformers 5.23): without
    torchvision their processors are refused in one line naming it, whether torchvision is missing (the
    CPU lane) or installed but broken (simulated in the GPU-user lane, where transformers would fall
    back to the torchvision class)."""
    path = build(family, tmp_path)
    if _torchvision_imports():
        monkeypatch.setitem(vlm._TORCHVISION, "problem", "RuntimeError: simulated: torchvision does not match torch")
    with pytest.raises(ValueError, match=r"^[^\n]*: \w+Processor needs torchvision, which does not import here [^\n]*$"):
        vlm.load_processor(path)


# ---- prompts and responses, as each family's template writes them ----------------------------
# templates that render a message with an image otherwise than one without, beyond the image item itself
IMAGES_CHANGE_THE_TEMPLATE = {"mllama": "a dated system turn is written only when no message has an image item"}


def _image_item_placeholder(proc, family):
    """What the template writes for one image item, found here independently of common: the
    difference between a message with and without a leading image item, outer white space stripped
    (IMAGES_CHANGE_THE_TEMPLATE: both messages start with an image item, one of them with two).
    Without a template: the processor's image token (which it expands)."""
    if proc.chat_template is None:
        return proc.image_token

    def render(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)

    lead = [{"type": "image"}] if family in IMAGES_CHANGE_THE_TEMPLATE else []
    a, b = render(lead + [{"type": "text", "text": "Q"}]), render(lead + [{"type": "image"}, {"type": "text", "text": "Q"}])
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    post = 0
    while post < min(len(a), len(b)) - pre and a[-1 - post] == b[-1 - post]:
        post += 1
    return b[pre:len(b) - post].strip()


WRAPPED = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>",
           "gemma3": "<start_of_image>", "gemma4": "<|image|>", "llava": "<image>", "idefics3": "<image>"}


@FAMILY
def test_chosen_and_rejected_rows_process_their_prompt_once_and_equal_processing_both(family, loaded):
    """build_inputs on [x; x] rows (06's chosen and rejected, pair_logps) runs the processor on the
    prompts once and doubles its outputs: every tensor equals processing all 2B rows."""
    _, proc = loaded(family)
    qs = [QUESTION, "<image>\nWhat color is the shape?"]
    ims = [IMAGES, IMAGES[:1]]
    answers = ["red", "a blue shape", "green", "a red shape on gray"]
    calls = []
    real = type(proc).__call__

    def counting(self, *a, **k):
        calls.append(len(k.get("text") or a[0]))
        return real(self, *a, **k)

    try:
        type(proc).__call__ = counting
        once = vlm.build_inputs(proc, qs * 2, ims * 2, answers=answers)  # the same image lists twice
    finally:
        type(proc).__call__ = real
    both = vlm.build_inputs(proc, qs * 2, [list(i) for i in ims * 2], answers=answers)  # new lists: no sharing
    assert calls == [2]
    assert once.keys() == both.keys()
    for k in both:
        if torch.is_tensor(both[k]):
            assert torch.equal(once[k], both[k]), k
        else:
            assert once[k] == both[k], k


def test_an_image_output_shaped_like_the_prompt_is_not_taken_for_a_per_token_input(loaded, monkeypatch):
    """build_inputs re-lays per-token tensors ([prompt | response | padding]); which ones is decided by
    name (not an image processor output), not by shape: LFM2-VL's pixel_attention_mask can have the
    prompt batch's shape and was re-laid as text, and its vision tower then failed."""
    _, proc = loaded("qwen2_5_vl")
    real = type(proc).__call__

    def with_a_mask(self, *a, **k):
        out = real(self, *a, **k)
        out["pixel_attention_mask"] = torch.ones_like(out["input_ids"])  # an image output, the prompt's shape
        return out

    monkeypatch.setattr(type(proc), "__call__", with_a_mask)
    monkeypatch.setattr(type(proc.image_processor), "model_input_names",
                        [*proc.image_processor.model_input_names, "pixel_attention_mask"], raising=False)
    enc = vlm.build_inputs(proc, [QUESTION], [IMAGES], answers=["red"])
    prompt_shape = real(proc, text=[vlm.render_prompt(proc, QUESTION)], images=[IMAGES], return_tensors="pt")["input_ids"].shape
    assert enc["pixel_attention_mask"].shape == prompt_shape != enc["input_ids"].shape  # left as the processor made it


@FAMILY
def test_render_prompt_writes_each_image_as_the_template_does_next_to_its_label(family, loaded):
    _, proc = loaded(family)
    placeholder = _image_item_placeholder(proc, family)
    assert vlm.image_placeholder(proc) == placeholder == WRAPPED.get(family, placeholder)
    prompt = vlm.render_prompt(proc, QUESTION)
    assert prompt.count(placeholder) == 2
    assert f"Image1:{placeholder}\nImage2:{placeholder}\nIn Image2," in prompt
    if family in NO_TEMPLATE:
        assert prompt == _template_prompt(proc)
    else:  # the template was told the message holds images, wherever it keeps them at their labels
        items = [{"type": "text", "text": "Image1:"}, {"type": "image"}, {"type": "text", "text": "\nImage2:"},
                 {"type": "image"}, {"type": "text", "text": "\nIn Image2, what color is the shape?"}]
        with_images = vlm._chat(proc, [{"role": "user", "content": items}], add_generation_prompt=True)  # non-thinking
        assert (prompt == with_images) == (f"Image1:{placeholder}\nImage2:" in with_images)
    if family in IMAGES_CHANGE_THE_TEMPLATE:  # the prompt is the one the release writes for a message with images
        assert "Today Date" not in prompt and prompt.startswith("<|begin_of_text|><|start_header_id|>user")


@FAMILY
def test_render_pair_splits_the_conversation_at_the_generation_prompt(family, loaded):
    """The prompt is the generation prompt, even where the template renders an answer turn's
    opening differently (OneVision: `assistant \\n`; Gemma 4: no empty thought channel)."""
    _, proc = loaded(family)
    prompt, response = vlm.render_pair(proc, QUESTION, " blue ")
    assert prompt == vlm.render_prompt(proc, QUESTION) and response.strip().startswith("blue")


@FAMILY
def test_the_scored_response_ends_at_the_first_token_generation_stops_at(family, loaded):
    """Answer + the end-of-turn token the model emits, nothing more (Gemma 3 / Idefics3: no EOS
    after <end_of_turn> / <end_of_utterance>), and the prompt's tokens are those generation sees."""
    model, proc = loaded(family)
    batch = vlm.build_inputs(proc, [QUESTION], [IMAGES], answers=["blue"])
    scored = batch["labels"][0][batch["labels"][0] != vlm.IGNORE_INDEX].tolist()
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    assert scored[-1] in stop and not stop & set(scored[:-1]), proc.tokenizer.decode(scored)
    assert proc.tokenizer.decode(scored[:-1], skip_special_tokens=True).strip() == "blue"  # Aya: + <|END_RESPONSE|>
    gen = vlm.build_inputs(proc, [QUESTION], [IMAGES])
    n = int(batch["prompt_lens"][0])
    assert torch.equal(batch["input_ids"][0, :n], gen["input_ids"][0])
    for k, v in gen.items():  # every per-token tensor the processor makes is carried, prompt part unchanged
        if torch.is_tensor(v) and v.shape == gen["input_ids"].shape:
            assert torch.equal(batch[k][0, :n], v[0]), k
    with torch.no_grad():
        total, _, n_tok = vlm.response_logps(model, vlm.to_model(batch, model))
    assert torch.isfinite(total).all() and int(n_tok[0]) == len(scored)
    if "suffix" in inspect.signature(type(proc).__call__).parameters:  # PaliGemma encodes an answer itself (its
        own = proc(text=[vlm.render_prompt(proc, QUESTION)], images=[IMAGES], suffix=["blue"], return_tensors="pt")
        typed = vlm.to_model(batch, model)  # fine-tuning format): the same tokens, token types and labels
        assert all(torch.equal(typed[k], own[k]) for k in ("input_ids", "token_type_ids", "labels"))


@FAMILY
def test_response_logps_equal_generation_fed_one_token_at_a_time(family, tiny_dirs):  # noqa: F811
    """The scored answer's per-token log-probs (one teacher-forced forward) equal what generation
    computes feeding the same tokens one at a time over its cache (each forced, raw logits): a
    causal reference in the family's own generation code. PaliGemma is a prefix-LM: with its
    processor's token types the answer sat in the bidirectional prefix and saw later answer tokens
    (4e-2 off on the first token); vlm.to_model types them as generation does."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    model, proc = vlm.load_model(tiny_dirs(family), dtype="float32")
    batch = vlm.to_model(vlm.build_inputs(proc, [QUESTION], [IMAGES], answers=["red blue"]), model)
    with torch.no_grad():
        _, token_lp, _ = vlm.response_logps(model, batch)
    scored = batch["labels"][0, 1:] != vlm.IGNORE_INDEX
    want, teacher = batch["labels"][0, 1:][scored].tolist(), token_lp[0][scored]
    gen = vlm.to_model(vlm.build_inputs(proc, [QUESTION], [IMAGES], padding_side="left"), model)
    P = gen["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**gen, do_sample=False, max_new_tokens=len(want), output_logits=True,
                             return_dict_in_generate=True, prefix_allowed_tokens_fn=lambda b, ids: [want[len(ids) - P]])
    assert out.sequences[0, P:].tolist() == want
    fed = torch.stack([torch.log_softmax(x[0].float(), -1)[t] for x, t in zip(out.logits, want)])
    assert torch.allclose(teacher.float(), fed, atol=1e-4), (teacher, fed)


@FAMILY
def test_image_positions_give_each_image_its_tokens_whatever_separates_them(family, loaded):
    """Idefics3 / SmolVLM frame each tile with <fake_token_around_image><row_i_col_j>, so an image is
    several runs of image tokens; the counts of token_geometry.image_token_boxes assign them."""
    model, proc = loaded(family)
    batch = vlm.build_inputs(proc, [QUESTION], [IMAGES])
    counts = vlm.emitted_image_tokens(proc, IMAGES, vlm.image_token_id(model))  # the processor's own expansion
    positions = vlm.image_positions(batch["input_ids"], vlm.image_token_id(model), [counts])[0]
    assert [len(p) for p in positions] == IMAGE_TOKENS[family]
    assert positions[0].max() < positions[1].min()


# ---- 06: DPO on every family, the fast path exact or visibly off -------------------------------
dpo = importlib.import_module("06_train_dpo")
PAIRS = [  # 1-3 images of different sizes; answers of different lengths
    {"id": "a", "images": ["im0.png", "im1.png"], "prompt": QUESTION, "chosen": "blue", "rejected": "red"},
    {"id": "b", "images": ["im2.png"], "prompt": "Image1:<image>\nIn Image1, what color is the shape?",
     "chosen": "green", "rejected": "The shape is blue."},
    {"id": "c", "images": ["im1.png", "im2.png", "im0.png"],
     "prompt": "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image3, what color is the background?",
     "chosen": "red", "rejected": "green"},
]
PLAIN_ONLY = {  # why 06 trains these on the plain [chosen; rejected] rows: prefix_sharing.fast_path_blocker's reason
    "qwen3_5": "linear_attention layers carry a recurrent state",  # Gated DeltaNet: no mask reaches it
    "lfm2_vl": "conv layers carry a recurrent state",  # LFM2's short convolutions: no mask reaches them
    "llama4": "chunked_attention layers see only the keys in the query's chunk",  # + NoPE layers' temperature tuning
    "paligemma2": "it is a prefix-LM",  # token_type_ids: generated tokens 1 (causal), the prompt 0 (both ways)
    # Mllama's cross_attention_mask (B, T, images, tiles): which images each token sees
    "mllama": "its per-token inputs ['cross_attention_mask'] are not re-laid",
}


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_images")
    for i, (size, colour) in enumerate([((64, 48), (200, 30, 30)), ((40, 64), (30, 30, 200)), ((56, 56), (30, 200, 30))]):
        Image.new("RGB", size, colour).save(root / f"im{i}.png")
    return root


def _policy(model, lora=True):
    torch.manual_seed(0)
    policy, _ = train_state.prepare_policy(model, "adapters-disabled" if lora else "frozen-copy", lora_r=4 if lora else 0,
                                           lora_alpha=8)
    for name, p in policy.named_parameters():  # LoRA B starts at 0: make policy != reference
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return policy


def _logps_and_grads(policy, model, batch):
    policy.zero_grad(set_to_none=True)
    pc, pr, _, _ = dpo.score(model, batch)
    (pc.sum() - pr.sum()).backward()
    return torch.cat([pc, pr]).detach(), {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}


@FAMILY
def test_06_lora_trains_the_decoder_only_and_the_fast_path_equals_the_plain_one(family, tiny_dirs, pair_images):  # noqa: F811
    """LoRA lands on the decoder's linear layers whatever the family calls it; vision tower and
    projector / merger / connector stay frozen. Where fast_path_blocker lets the fast path run
    (prefix sharing + images encoded once), its log-probs and gradients equal the plain path's
    (1e-4); where not, the reason is the family's."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    model, proc = vlm.load_model(tiny_dirs(family), dtype="float32")
    policy = _policy(model)
    decoder, vision, projector = train_state.model_parts(model)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and f".{decoder}." in f".{n}" for n in trained), sorted(trained)[:3]
    plain = dpo.collate(PAIRS, pair_images, proc, model)
    why = prefix_sharing.fast_path_blocker(model, plain)
    lp_a, g_a = _logps_and_grads(policy, model, plain)
    assert torch.isfinite(lp_a).all() and g_a and any(g.abs().max() > 1e-4 for g in g_a.values())
    if family in PLAIN_ONLY:
        assert why and PLAIN_ONLY[family] in why
        return
    assert why is None
    fast = prefix_sharing.lay_out(model, plain)  # prefix-shared rows, images encoded once: what 06 trains on
    assert fast["input_ids"].shape[0] == len(PAIRS) and "pixel_values" not in fast
    if hasattr(model.model, "get_rope_index"):  # M-RoPE: (t, h, w) positions re-laid from the plain rows
        assert fast["position_ids"].shape == (3, *fast["input_ids"].shape)
    if "sliding_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or []):
        assert set(fast["attention_mask"]) == {"full_attention", "sliding_attention"}  # one mask per layer type
    _assert_same_logps_and_grads(policy, model, fast, lp_a, g_a)


def _assert_same_logps_and_grads(policy, model, fast, lp_a, g_a):
    lp_b, g_b = _logps_and_grads(policy, model, fast)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-4, rtol=0)
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], atol=1e-4, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_06_fast_path_with_a_sliding_window_shorter_than_the_prompt_equals_the_plain_one(family, tiny_dirs, pair_images,
                                                                                         tmp_path):  # noqa: F811
    """The tiny Gemma with 3 layers [full, sliding, full] and a 4-token window: far shorter than
    the 1-3 image prompts, so the window cuts into what a rejected token sees of the prompt, and it
    must be measured in positions (a rejected token's distance in its plain row), not in the
    shared row's indices (c more). A full layer before the sliding one makes the image-block rule
    of full layers count too (Gemma 3: both ways; Gemma 4: causal), which a last layer would not
    (its image tokens' outputs reach no answer token). Log-probs and gradients equal the plain path's."""
    src, _ = vlm.load_model(tiny_dirs(family), dtype="float32")
    cfg = src.config
    text = cfg.get_text_config()
    text.num_hidden_layers, text.sliding_window = 3, 4
    text.layer_types = ["full_attention", "sliding_attention", "full_attention"]  # Gemma 4: the last must be full
    torch.manual_seed(0)
    folder = tmp_path / family
    shutil.copytree(tiny_dirs(family), folder)
    type(src)._from_config(cfg).save_pretrained(folder)
    model, proc = vlm.load_model(folder, dtype="float32")
    assert model.config.get_text_config().layer_types == text.layer_types
    policy = _policy(model)
    plain = dpo.collate(PAIRS, pair_images, proc, model)
    assert int(plain["prompt_lens"].min()) > 4 * text.sliding_window and prefix_sharing.fast_path_blocker(model, plain) is None
    lp_a, g_a = _logps_and_grads(policy, model, plain)
    _assert_same_logps_and_grads(policy, model, prefix_sharing.lay_out(model, plain), lp_a, g_a)


@pytest.mark.slow
@FAMILY
def test_06_main_runs_two_steps_and_saves_a_model_07_loads(family, tiny_dirs, pair_images, tmp_path, capsys):  # noqa: F811
    """The command line end to end: pairs without stored log-probs, LoRA, batch 2, the fast path's
    first-batch self-check (or the plain path, said in the log with its reason), merge, and the result loads."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    pairs = tmp_path / "pairs.jsonl"
    rows = [{**p, "id": f"{p['id']}{k}", "image": p["images"]} for k in range(2) for p in PAIRS]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    dpo.main(dpo.get_args(["--pairs", str(pairs), "--image-root", str(pair_images), "--model", str(tiny_dirs(family)),
                           "--out", str(out), "--recipe", "paper", "--dtype", "float32", "--no-grad-ckpt",
                           "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8",
                           "--max-steps", "2", "--warmup-steps", "0", "--save-every", "0", "--threads", "1"]))
    log = [r for _, r in common.read_rows(out / "log.jsonl")]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    meta = json.loads((out / "log.jsonl.meta.json").read_text())
    assert meta["args"]["prefix_sharing"] is (family not in PLAIN_ONLY)
    said = capsys.readouterr().out
    if family in PLAIN_ONLY:
        assert "06_train_dpo: plain path" in said and PLAIN_ONLY[family] in said
    else:
        assert "06_train_dpo: fast path for" in said and "fast path checked against the plain path" in said
    model, proc = vlm.load_model(out / "final", dtype="float32")
    assert vlm.generate(model, proc, [QUESTION], [IMAGES], max_new_tokens=3)


# ---- 04: the probe and the three formats on every family --------------------------------------
gp = importlib.import_module("04_gen_pairs")


def _eager_response_attention(model_dir, batch, layer, model):
    """All layers' attentions kept (eager), the probed layer's response rows, heads averaged."""
    eager, _ = vlm.load_model(model_dir, dtype="float32", attn_implementation="eager")
    # the answer typed as generation types it (a prefix-LM's processor types it as the bidirectional prefix)
    inputs = {k: v for k, v in vlm.to_model(batch, eager).items() if k not in ("labels", "prompt_lens")}
    with torch.no_grad():
        att = [a for a in eager(**inputs, output_attentions=True).attentions if a is not None]
    # hybrid models return the attention layers' only; a cross-attention model every layer's (self and cross)
    att = att[layer] if len(att) == len(vlm.decoder_layers(model)) else att[gp.attention_layers(model).index(layer)]
    pos = (batch["labels"][0] != vlm.IGNORE_INDEX).nonzero().flatten()
    return att[0].mean(0)[int(pos[0]) - 1:int(pos[-1])].mean(0)


@FAMILY
def test_04_probe_equals_eager_attentions_and_finds_each_images_tokens(family, loaded, tiny_dirs):  # noqa: F811
    model, proc = loaded(family)
    gp.install_probe(model)
    layer = gp.default_layer(model)
    if family in CROSS_ATTENTION:  # the probed layer's keys are the images' features: 04's token_boxes counts them
        counts = gp.token_boxes(proc, IMAGES, {}, key_patch=model.config.vision_config.patch_size)[0]
    else:
        counts = vlm.emitted_image_tokens(proc, IMAGES, vlm.image_token_id(model))
    attn, positions, _, _ = gp.probe_forward(model, proc, [QUESTION], [IMAGES], ["a red one"], layer, [counts])
    assert [len(p) for p in positions[0]] == CROSS_KEYS.get(family, IMAGE_TOKENS[family])
    batch = vlm.build_inputs(proc, [QUESTION], [IMAGES], answers=["a red one"])
    ids = batch["input_ids"][0]
    if family in CROSS_ATTENTION:  # Mllama's processor lets a text token see the last image before it (or the run
        # of images right before it): the answer, after Image2, sees Image2 only
        assert layer in gp.cross_attention_layers(model)
        assert attn[0][positions[0][0]].sum() == 0 and abs(attn[0][positions[0][1]].sum() - 1) < 1e-5
    else:
        assert all((ids[p] == vlm.image_token_id(model)).all() for p in positions[0])
    ref = _eager_response_attention(tiny_dirs(family), batch, layer, model)
    assert np.abs(attn[0] - ref.numpy()).max() < 1e-5


@pytest.fixture(scope="module")
def mia_rows(tmp_path_factory):
    """One sequence, one 1x2 grid and one pic-in-pic row on coloured images, as 01-03 write them."""
    root = tmp_path_factory.mktemp("mia_rows")
    files, _ = write_mia_rows(root)
    files = [str(f) for f in files.values()]
    return root, files


@FAMILY
def test_04_runs_every_format_and_stores_the_reference_06_would_compute(family, tiny_dirs, mia_rows, tmp_path):  # noqa: F811
    """The stage end to end: answers, a real ratio for each format (grid cell / inset through the
    family's views), a heatmap, every wrong answer a pair (thresholds off), and the stored
    reference log-probs equal to 06's plain forward on the clean images."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    root, files = mia_rows
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pairs, cands = gp.main(gp.get_args(
            ["--data", *files, "--image-root", str(root), "--model", str(tiny_dirs(family)), "--out",
             str(tmp_path / "pairs.jsonl"), "--max-new-tokens", "4", "--min-ppl", "0", "--viz", "1", "--threads", "1",
             "--threshold", "sequence=inf", "--threshold", "grid=inf", "--threshold", "pip=inf"]))
    assert [c["format"] for c in cands] == ["sequence", "grid", "pip"]
    if family in NO_GEOMETRY:  # sequence rows need token counts only; grid / pip rows: skipped, with the reason
        assert [c["reason"].split(":")[0] for c in cands[1:]] == ["no token geometry"] * 2
        cands = cands[:1]
    for c in cands:
        assert 0 <= c["ratio"] <= 1 and len(c["attn_images"]) == (2 if c["format"] == "sequence" else 1)
    assert family in NO_GEOMETRY or 0 < cands[1]["ratio"] < 1  # the two cells share the collage's attention
    assert len(list((tmp_path / "pairs.viz").glob("*.png"))) == (0 if family in NO_GEOMETRY else 3)  # heatmaps need boxes
    assert all(p["ref_model"]["fingerprint"] for p in pairs)
    # what 04 stores as the reference (vlm.pair_logps on the clean images) == 06's plain forward
    model, proc = vlm.load_model(tiny_dirs(family), dtype="float32")
    row = {"id": "s", "images": ["red.png", "blue.png"], "prompt": QUESTION, "chosen": "blue", "rejected": "a red one"}
    ims = [common.load_image(root, x) for x in row["images"]]
    c, r = vlm.pair_logps(model, proc, [row["prompt"]], [ims], [row["chosen"]], [row["rejected"]])
    with torch.no_grad():
        plain = dpo.concatenated_forward(model, dpo.collate([row], root, proc, model))
    assert abs(c[0] - float(plain[0][0])) < 1e-4 and abs(r[0] - float(plain[1][0])) < 1e-4


# ---- 07: answers and scores on every family ----------------------------------------------------
ev = importlib.import_module("07_eval")


@pytest.mark.slow
@FAMILY
def test_07_answers_scores_and_pair_logps(family, tiny_dirs, mia_rows, tmp_path):  # noqa: F811
    """07 with the family's own prompts: every question answered and scored into its group, a
    random model's mistakes scored as held-out pairs by a second model (the same checkpoint)."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    root, files = mia_rows
    out = tmp_path / "eval"
    with contextlib.redirect_stdout(io.StringIO()):
        ev.main(ev.get_args(["--model", f"a={tiny_dirs(family)}", "--model", f"b={tiny_dirs(family)}", "--data", *files,
                             "--image-root", str(root), "--out", str(out), "--max-new-tokens", "4", "--threads", "1"]))
    report = json.loads((out / "report.json").read_text())
    answers = [json.loads(line) for line in (out / "answers-a.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and {a["group"] for a in answers} == set(report["a"]["groups"]) - {"multi-image"}
    assert report["a"]["groups"] == report["b"]["groups"]  # the same weights answer the same
    pairs = report["a"].get("pairs")
    if pairs:  # a's mistakes, scored by both: the same log-probs, so no change against a
        assert report["b"]["pairs"]["all"]["n"] == pairs["all"]["n"]
        assert abs(report["b"]["pairs"]["all"]["chosen_change"]) < 1e-4


# ---- the visual-token budget ---------------------------------------------------------------------
CAPS = {"llava": 4, "llava_next": 24, "llava_onevision": 12, "qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4,
        "qwen3_5": 4, "internvl": 20, "gemma3": 4, "gemma4": 70, "idefics3": 12, "smolvlm": 12, "qwen3_vl_moe": 4,
        "glm4v": 4, "aya_vision": 20, "paligemma2": 4, "mistral3": 16, "llama4": 20, "lfm2_vl": 36,  # LFM2-VL: no knob known, its maximum
        "mllama": None}  # refused: one <|image|> per image whatever its tiles (its features are the keys)


@pytest.mark.slow
@FAMILY
def test_cap_image_tokens_uses_the_familys_own_setting_and_is_recorded(family, tiny_dirs):  # noqa: F811
    """A large image stays within the cap, through the processor itself; the geometry still matches
    what the processor emits; the settings' record changes exactly when a setting did."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    proc = vlm.load_processor(tiny_dirs(family))
    if family in CROSS_ATTENTION:  # one text token per image: a token cap would bound nothing, so it is refused
        with pytest.raises(ValueError, match=f"{type(proc).__name__}: .*cross-attention.*max_image_tiles"):
            vlm.cap_image_tokens(proc, 1024)
        return
    big = Image.new("RGB", (1000, 700), (90, 90, 90))
    before, record = vlm.emitted_image_tokens(proc, [big])[0], vlm.image_settings_id(proc)
    changed = vlm.cap_image_tokens(proc, CAPS[family])
    (after,) = vlm.emitted_image_tokens(proc, [big])
    assert after <= CAPS[family] and after <= before
    if family not in NO_GEOMETRY:  # the geometry follows the capped setting
        assert len(token_geometry.image_token_boxes(proc, [big])[0]) == after
    assert (vlm.image_settings_id(proc) != record) == bool(changed)
    if family in ("qwen2_5_vl", "internvl", "idefics3", "llava_onevision"):  # dynamic resolution: really capped
        assert changed and after < before
    with pytest.raises(ValueError, match=type(proc).__name__):
        vlm.cap_image_tokens(vlm.load_processor(tiny_dirs(family)), 0)


@FAMILY
def test_04_probe_during_generation_equals_teacher_forced_rows(family, loaded):  # noqa: F811
    """04 --probe during-generation on every family: each generation step's probe row (prefill's
    last position, then each fed token, over the KV cache) and each generated token's log-prob
    equal a teacher-forced forward over prompt + the same generated token ids, to 1e-5. (04 uses
    them only where those ids are the tokens it scores; a random tiny model's answers rarely are,
    and such rows take the teacher-forced path: test_gen_pairs covers that on the toy.)"""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    model, proc = loaded(family)
    gp.install_probe(model)
    layer = gp.default_layer(model)
    with torch.no_grad(), gp.probing(layer, "last") as probe:
        g = vlm.generate_scored(model, proc, [QUESTION], [IMAGES], 4)
        steps = list(probe["steps"])
    toks = g["tokens"][0]
    assert toks and len(steps) >= len(toks)
    batch = vlm.to_model(vlm.build_inputs(proc, [QUESTION], [IMAGES]), model)  # one row: no padding
    P, ids = batch["input_ids"].shape[1], batch["input_ids"]
    fed = torch.tensor([toks[:-1]], dtype=ids.dtype, device=ids.device)  # the last token is produced, never fed
    typed = {"attention_mask": 1, **vlm.response_types(model, batch)}  # fed tokens typed as generation types them
    inputs = {k: torch.cat([v, torch.full_like(fed, typed.get(k, 0))], dim=1)
              if torch.is_tensor(v) and v.shape == ids.shape and k != "input_ids" else v for k, v in batch.items()}
    for k, v in batch.items():  # Mllama's cross_attention_mask (B, T, images, tiles): a fed token sees what the last did
        if torch.is_tensor(v) and v.dim() > 2 and v.shape[:2] == ids.shape:
            inputs[k] = torch.cat([v, v[:, -1:].expand(-1, fed.shape[1], *v.shape[2:])], dim=1)
    inputs["input_ids"] = torch.cat([ids, fed], dim=1)
    with torch.no_grad(), gp.probing(layer, [(P - 1, P - 1 + len(toks))]) as tf:
        logits = model(**inputs, use_cache=False).logits[0, P - 1:].float()
    rows = torch.stack([s[0, :P] for s in steps[:len(toks)]]).mean(0)
    assert torch.abs(rows - tf["out"][0, :P]).max() < 1e-5
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks, device=logits.device)[:, None])[:, 0]
    assert np.allclose(g["token_logps"][0], want.cpu().numpy(), atol=1e-5, rtol=0)


NO_PROMPT_CACHE = {"qwen3_5": "linear-attention layers carry a recurrent state crop cannot put back"}


def _chosen_from_the_prompt_cache(model, proc, questions, images):
    """score_after_prompt on generation's cache vs the teacher-forced forward 04 runs otherwise:
    three left-padded prompts of 2, 1 and 2 images, rows out of order, one row with two answers."""
    with torch.no_grad():
        g = vlm.generate_scored(model, proc, questions, images, 4, keep_prompt=True)
    if g["prompt"] is None:
        return None
    rows, answers = [2, 0, 1, 1], ["blue", "a red one", "red", "the shape is red"]
    got = vlm.score_after_prompt(model, g["prompt"], rows, vlm.response_ids(proc, [questions[b] for b in rows], answers))
    batch = vlm.to_model(vlm.build_inputs(proc, [questions[b] for b in rows], [images[b] for b in rows],
                                          answers=answers), model)
    with torch.no_grad():
        want = vlm.response_logps(model, batch)[0].tolist()
    return np.abs(np.array(got) - np.array(want)).max()


@FAMILY
def test_04_chosen_scored_from_the_prompt_cache_equals_teacher_forced(family, loaded):  # noqa: F811
    """04 --probe during-generation scores a pair's chosen answer from generation's KV cache of its prompt
    (only the answer's tokens run: no vision tower, no prompt again), equal to the teacher-forced
    forward to 1e-5 on every family whose cache crop can put back to the prompt (M-RoPE positions,
    Gemma's bidirectional image blocks inside the cached prompt, PaliGemma's prefix-LM types, LFM2's
    convolution states); the others (NO_PROMPT_CACHE) keep the forward."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    model, proc = loaded(family)
    gp.install_probe(model)
    one = "Image1:<image>\nWhat color is the shape?"
    diff = _chosen_from_the_prompt_cache(model, proc, [QUESTION, one, QUESTION], [IMAGES, IMAGES[:1], IMAGES[::-1]])
    assert (diff is None) == (family in NO_PROMPT_CACHE)
    assert diff is None or diff < 1e-5


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_04_chosen_from_the_prompt_cache_with_a_sliding_window_shorter_than_the_prompt(family, tiny_dirs, tmp_path):  # noqa: F811
    """A 4-token sliding window (layers [full, sliding, full]): generation's sliding layers record what
    they drop until the cache is cropped back to the prompt, so the chosen still sees the right window."""
    src, _ = vlm.load_model(tiny_dirs(family), dtype="float32")
    text = src.config.get_text_config()
    text.num_hidden_layers, text.sliding_window = 3, 4
    text.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    shutil.copytree(tiny_dirs(family), tmp_path / family)
    type(src)._from_config(src.config).save_pretrained(tmp_path / family)
    model, proc = vlm.load_model(tmp_path / family, dtype="float32")
    gp.install_probe(model)
    one = "Image1:<image>\nWhat color is the shape?"
    assert _chosen_from_the_prompt_cache(model, proc, [QUESTION, one, QUESTION], [IMAGES, IMAGES[:1], IMAGES[::-1]]) < 1e-5


@FAMILY
def test_04_during_generation_stage_equals_teacher_forced(family, tiny_dirs, mia_rows, tmp_path):  # noqa: F811
    """04 end to end on every family in both --probe modes: the same answers and reasons, ratios,
    PPL and reference log-probs to 1e-5. A random tiny model rarely emits a stop token, so its copy
    here ends every answer within a few tokens (generation_config's exponential_decay_length_penalty:
    a logits processor, the raw logits scored are unchanged) and, thresholds off, every row is a pair:
    the sequence row's chosen reference comes from generation's prompt cache (the log counts it;
    NO_PROMPT_CACHE families: the forward). Most rows still take the teacher-forced probe (random
    tokens rarely re-tokenise as generated); test_04_probe_during_generation_equals_teacher_forced_rows
    checks the rows taken while generating, test_gen_pairs the toy where most rows are."""
    if family == "smolvlm":
        pytest.importorskip("num2words")
    root, files = mia_rows
    model_dir = shutil.copytree(tiny_dirs(family), tmp_path / "model")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "exponential_decay_length_penalty": [1, 1e4]}))
    runs = {}
    for mode in ("teacher-forced", "during-generation"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            runs[mode] = gp.main(gp.get_args(
                ["--data", *files, "--image-root", str(root), "--model", str(model_dir), "--out",
                 str(tmp_path / mode / "pairs.jsonl"), "--max-new-tokens", "6", "--min-ppl", "0", "--threads", "1",
                 "--threshold", "sequence=inf", "--threshold", "grid=inf", "--threshold", "pip=inf", "--probe", mode]))
    used = ast.literal_eval(re.search(r"--probe during-generation: (\{.*?\})", buf.getvalue()).group(1))
    (p_t, c_t), (p_d, c_d) = runs["teacher-forced"], runs["during-generation"]
    scored = [c for c in c_t if "ratio" in c]  # NO_GEOMETRY: grid / pip rows skipped in both
    assert c_t[0]["format"] == "sequence" and (len(scored) == 3 or family in NO_GEOMETRY)
    assert [p["id"] for p in p_t] == [c["id"] for c in scored if c["answer"].strip()]  # some tiny models answer "\n\n"
    if p_t:  # the sequence row was answered from its clean images: its chosen from the cache
        assert used["ref_chosen_cached"] == (0 if family in NO_PROMPT_CACHE else 1)
        assert used["ref_chosen_forward"] == len(p_t) - used["ref_chosen_cached"]
        assert used["ref_rejected_forward"] == len(p_t) - 1
    assert [(c.get("answer"), c["reason"]) for c in c_d] == [(c.get("answer"), c["reason"]) for c in c_t]
    for d, t in [(d, t) for d, t in zip(c_d, c_t) if "ratio" in t]:
        assert abs(d["ratio"] - t["ratio"]) <= 1.1e-5
        assert (d["ppl"] is None) == (t["ppl"] is None) and (t["ppl"] is None or math.isclose(d["ppl"], t["ppl"], rel_tol=1e-5))
    assert [p["id"] for p in p_d] == [p["id"] for p in p_t]
    for d, t in zip(p_d, p_t):
        assert abs(d["ref_chosen_logps"] - t["ref_chosen_logps"]) < 1e-5
        assert abs(d["ref_rejected_logps"] - t["ref_rejected_logps"]) < 1e-5
