"""Every VLM family of tests/tiny_families.py through common.py's model plumbing, offline.

What holds today (plain tests): each tiny checkpoint loads through common.load_model as its
family's real model / processor / image-processor classes, also without torchvision; its
processor expands a two-image prompt into exactly the visual tokens the model's vision side
produces; a forward pass works.

Prompts and responses: each family's template decides how an image item is written (its
wrappers), where the answer turn starts and which token ends it; common.render_prompt /
render_pair / build_inputs follow it.

What does not hold yet (xfail(strict=True), one reason per family): when a fix lands, its xfail
turns into an XPASS failure: remove the mark then.
"""
import importlib
import inspect
import json
import math

import pytest
import torch
from PIL import Image

import common
from tiny_families import FAMILIES, FAMILIES_SPEC, tiny_dirs  # noqa: F401  (tiny_dirs is a fixture)

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
}
FAMILY = pytest.mark.parametrize("family", FAMILIES)


def _torchvision_imports():
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError):
        return False
    return True


@pytest.fixture(scope="session")
def loaded(tiny_dirs):  # noqa: F811
    """loaded(family) -> (model, processor), through common.load_model, once per session."""
    cache = {}

    def get(family):
        if family == "smolvlm":  # SmolVLMProcessor refuses to start without it (a small pure-Python package)
            pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (requirements: num2words)")
        if family not in cache:
            cache[family] = common.load_model(tiny_dirs(family), dtype="float32")
        return cache[family]

    return get


def _template_messages():
    """The question as the family's template sees an interleaved message: text, image, text, ..."""
    parts, content = QUESTION.split("<image>"), []
    for i, text in enumerate(parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(parts) - 1:
            content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def _feature_counts(model, enc):
    """Per image (or per tile batch) visual-feature counts from the model's own vision side."""
    params = inspect.signature(model.model.get_image_features).parameters
    with torch.no_grad():
        out = model.model.get_image_features(**{k: v for k, v in enc.items() if k in params})
    feats = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return [f.numel() // f.shape[-1] for f in feats]


# ---- what holds ----------------------------------------------------------------------------
@FAMILY
def test_loads_offline_as_the_families_real_classes(family, loaded):
    model, proc = loaded(family)
    spec = SPEC[family]
    assert type(model).__name__ == spec.model_class
    assert type(proc).__name__ == spec.processor_class
    want_ip = spec.image_processor_class if not _torchvision_imports() else spec.image_processor_class[:-3]
    assert type(proc.image_processor).__name__ == want_ip
    assert proc.chat_template and "{%" in proc.chat_template
    assert model.generation_config.eos_token_id is not None
    if "video_processor" in type(proc).get_attributes() and not _torchvision_imports():
        # the video part needs torchvision: its saved settings stand in, and videos are refused
        assert proc.video_processor["video_processor_type"].endswith("VideoProcessor")
        with pytest.raises(RuntimeError, match="torchvision"):
            proc.video_processor([torch.zeros(2, 3, 32, 32)])


@FAMILY
def test_a_two_image_prompt_expands_into_the_tokens_the_model_expects(family, loaded):
    """The template renders both image items, the processor expands each placeholder, and the
    number of image-token positions equals the vision side's feature count; then a forward."""
    model, proc = loaded(family)
    prompt = proc.apply_chat_template(_template_messages(), add_generation_prompt=True, tokenize=False)
    enc = proc(text=[prompt], images=[IMAGES], return_tensors="pt")
    n_tokens = int((enc["input_ids"] == common.image_token_id(model)).sum())
    assert n_tokens == sum(IMAGE_TOKENS[family]) == sum(_feature_counts(model, enc))
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()


def test_load_processor_without_torchvision_saves_and_reloads_the_video_settings(tiny_dirs, tmp_path):  # noqa: F811
    """On this machine a video family's processor is the real class with its video settings only;
    save_pretrained writes them back, so the folder still loads on a torchvision machine."""
    if _torchvision_imports():
        pytest.skip("torchvision imports here: load_processor is plain AutoProcessor")
    proc = common.load_processor(tiny_dirs("qwen2_5_vl"))
    proc.save_pretrained(tmp_path)
    again = common.load_processor(tmp_path)
    assert type(again).__name__ == "Qwen2_5_VLProcessor"
    assert dict(again.video_processor) == dict(proc.video_processor)
    assert again.video_processor.merge_size == 2  # settings read as attributes, as the processor reads them
    a = proc(text=["<|image_pad|>"], images=[IMAGES[0]], return_tensors="pt")
    b = again(text=["<|image_pad|>"], images=[IMAGES[0]], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])


# ---- prompts and responses, as each family's template writes them ----------------------------
def _xfail(family, reasons):
    return pytest.param(family, marks=pytest.mark.xfail(strict=True, reason=reasons[family])) if family in reasons \
        else family


def _image_item_placeholder(proc):
    """What the template writes for one image item, found here independently of common: the
    difference between a message with and without a leading image item, outer white space stripped."""
    def render(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)

    a, b = render([{"type": "text", "text": "Q"}]), render([{"type": "image"}, {"type": "text", "text": "Q"}])
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
def test_render_prompt_writes_each_image_as_the_template_does_next_to_its_label(family, loaded):
    _, proc = loaded(family)
    placeholder = _image_item_placeholder(proc)
    assert common.image_placeholder(proc) == placeholder == WRAPPED.get(family, placeholder)
    prompt = common.render_prompt(proc, QUESTION)
    assert prompt.count(placeholder) == 2
    assert f"Image1:{placeholder}\nImage2:{placeholder}\nIn Image2," in prompt


@FAMILY
def test_render_pair_splits_the_conversation_at_the_generation_prompt(family, loaded):
    """The prompt is the generation prompt, even where the template renders an answer turn's
    opening differently (OneVision: `assistant \\n`; Gemma 4: no empty thought channel)."""
    _, proc = loaded(family)
    prompt, response = common.render_pair(proc, QUESTION, " blue ")
    assert prompt == common.render_prompt(proc, QUESTION) and response.strip().startswith("blue")


@FAMILY
def test_the_scored_response_ends_at_the_first_token_generation_stops_at(family, loaded):
    """Answer + the end-of-turn token the model emits, nothing more (Gemma 3 / Idefics3: no EOS
    after <end_of_turn> / <end_of_utterance>), and the prompt's tokens are those generation sees."""
    model, proc = loaded(family)
    batch = common.build_inputs(proc, [QUESTION], [IMAGES], answers=["blue"])
    scored = batch["labels"][0][batch["labels"][0] != common.IGNORE_INDEX].tolist()
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    assert scored[-1] in stop and not stop & set(scored[:-1]), proc.tokenizer.decode(scored)
    assert proc.tokenizer.decode(scored[:-1]).strip() == "blue"
    gen = common.build_inputs(proc, [QUESTION], [IMAGES])
    n = int(batch["prompt_lens"][0])
    assert torch.equal(batch["input_ids"][0, :n], gen["input_ids"][0])
    for k, v in gen.items():  # every per-token tensor the processor makes is carried, prompt part unchanged
        if torch.is_tensor(v) and v.shape == gen["input_ids"].shape:
            assert torch.equal(batch[k][0, :n], v[0]), k
    with torch.no_grad():
        total, _, n_tok = common.response_logps(model, batch)
    assert torch.isfinite(total).all() and int(n_tok[0]) == len(scored)


SPANS = {f: ("each tile is framed by <fake_token_around_image><row_i_col_j> (the global view by <global-img>), "
             "so an image is 5 runs of image tokens: image_spans' one-run-per-image split raises")
         for f in ("idefics3", "smolvlm")}


@pytest.mark.parametrize("family", [_xfail(f, SPANS) for f in FAMILIES])
def test_image_spans_gives_one_span_per_image_holding_its_tokens(family, loaded):
    model, proc = loaded(family)
    batch = common.build_inputs(proc, [QUESTION], [IMAGES])
    spans = common.image_spans(batch["input_ids"], common.image_token_id(model), n_images=[2])[0]
    assert [e - s for s, e in spans] == IMAGE_TOKENS[family]


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
PLAIN_ONLY = {  # why 06 trains these on the plain path (section 2): fast_path_blocker's reason
    **{f: "M-RoPE" for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")},
    "gemma3": "sliding-window", "gemma4": "sliding-window",
}


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_images")
    for i, (size, colour) in enumerate([((64, 48), (200, 30, 30)), ((40, 64), (30, 30, 200)), ((56, 56), (30, 200, 30))]):
        Image.new("RGB", size, colour).save(root / f"im{i}.png")
    return root


def _policy(model, lora=True):
    args = dpo.get_args(["--lora-r", "4" if lora else "0", "--lora-alpha", "8", "--recipe", "paper"])
    common.apply_recipe(args, dpo.RECIPES, False, "06", quiet=True)
    torch.manual_seed(0)
    policy, _ = dpo.prepare_policy(model, args, "adapters-disabled" if lora else "frozen-copy")
    for name, p in policy.named_parameters():  # LoRA B starts at 0: make policy != reference
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return policy


def _logps_and_grads(policy, model, batch):
    policy.zero_grad(set_to_none=True)
    pc, pr, _, _ = dpo.pair_forward(model, batch)
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
    model, proc = common.load_model(tiny_dirs(family), dtype="float32")
    policy = _policy(model)
    decoder, vision, projector = dpo.model_parts(model)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and f".{decoder}." in f".{n}" for n in trained), sorted(trained)[:3]
    plain = dpo.collate(PAIRS, pair_images, proc, "cpu", torch.float32)
    why = dpo.fast_path_blocker(model, plain)
    lp_a, g_a = _logps_and_grads(policy, model, plain)
    assert torch.isfinite(lp_a).all() and g_a and any(g.abs().max() > 1e-4 for g in g_a.values())
    if family in PLAIN_ONLY:
        assert why and PLAIN_ONLY[family] in why
        return
    assert why is None
    fast = dpo.encode_images(model, dpo.build_shared_prefix_batch(plain, torch.float32))
    assert fast["input_ids"].shape[0] == len(PAIRS) and "pixel_values" not in fast
    lp_b, g_b = _logps_and_grads(policy, model, fast)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-4, rtol=0)
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], atol=1e-4, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
@FAMILY
def test_06_main_runs_two_steps_and_saves_a_model_07_loads(family, tiny_dirs, pair_images, tmp_path):  # noqa: F811
    """The command line end to end: pairs without stored log-probs, LoRA, batch 2, the fast path's
    first-batch self-check (or the plain path, said in the log), merge, and the result loads."""
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
    model, proc = common.load_model(out / "final", dtype="float32")
    assert common.generate(model, proc, [QUESTION], [IMAGES], max_new_tokens=3)
