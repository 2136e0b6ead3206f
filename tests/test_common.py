"""common.py on hand-made cases: data I/O, images, prompts, spans, log-probs, generation."""
import json
import os

import pytest
import torch
from PIL import Image

import common
import vlm

# llava-hf/llava-1.5-7b-hf's chat_template, copied here independently of 00_train_toy.py.
REAL_LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ---- data ---------------------------------------------------------------------------------
def _row(i, **kw):
    return {"id": f"r{i}", "image": f"a/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}], **kw}


def test_read_rows_json_list_and_jsonl_agree(tmp_path):
    rows = [_row(i) for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    a = list(common.read_rows(tmp_path / "d.json"))
    b = list(common.read_rows(tmp_path / "d.jsonl"))
    assert [r for _, r in a] == [r for _, r in b] == rows
    assert [ln for ln, _ in b] == [1, 2, 3]
    text = (tmp_path / "d.json").read_text().splitlines()
    opening = [i + 1 for i, ln in enumerate(text) if ln == " {"]  # top-level objects open at indent 1
    assert [ln for ln, _ in a] == opening == [2, 16, 30]


def test_read_rows_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(_row(1)) + "\n{broken\n" + json.dumps(_row(3)) + "\n[1, 2]\n")
    with pytest.raises(common.DataError, match=r"d\.jsonl:2: invalid JSON"):
        list(common.read_rows(p))
    skips = common.Skips()
    got = list(common.read_rows(p, on_error="skip", skips=skips))
    assert [r["id"] for _, r in got] == ["r1", "r3"]
    assert len(skips) == 2 and [s["line"] for s in skips.rows] == [2, 4]
    with pytest.raises(common.DataError, match="no such file"):
        list(common.read_rows(tmp_path / "missing.jsonl"))


def test_read_rows_broken_json_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(common.DataError, match=r"d\.json:3: invalid JSON"):
        list(common.read_rows(p))


@pytest.mark.parametrize("change, field", [
    ({"id": ""}, "id"),
    ({"image": 5}, "image"),
    ({"image": []}, "image"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "conversations"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}, r"conversations\[0\]\.from"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}, r"conversations\[1\]\.value"),
])
def test_check_llava_row_names_the_field(change, field):
    with pytest.raises(common.DataError, match=rf"f\.jsonl:7: {field}"):
        common.check_llava_row({**_row(1), **change}, "f.jsonl", 7)
    assert common.check_llava_row(_row(1)) == ["a/1.png"]
    assert common.check_llava_row({**_row(1), "image": ["x.png", "y.png"]}) == ["x.png", "y.png"]


def test_atomic_write_survives_exception_mid_write(tmp_path):
    p = tmp_path / "out.jsonl"
    common.write_jsonl(p, [{"a": 1}])
    before = p.read_bytes()

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        common.write_jsonl(p, rows())
    assert p.read_bytes() == before  # the old file is intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind
    common.write_sidecar(p, counts={"rows": 1})
    assert json.loads(common.sidecar_path(p).read_text())["counts"] == {"rows": 1}
    umask = os.umask(0o022)
    try:
        common.write_jsonl(p, [{"a": 3}])
    finally:
        os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o644  # an ordinary file, not the temp file's private 0600


def test_row_rng_is_per_row_and_seeded():
    assert common.row_rng(0, "x").random() == common.row_rng(0, "x").random()
    assert common.row_rng(0, "x").random() != common.row_rng(1, "x").random()
    assert common.row_rng(0, "x").random() != common.row_rng(0, "y").random()


# ---- images -------------------------------------------------------------------------------
def _save(tmp_path, name, im, **kw):
    im.save(tmp_path / name, **kw)
    return name


def test_load_image_modes_become_rgb(tmp_path):
    cases = {
        "rgba.png": Image.new("RGBA", (4, 3), (255, 0, 0, 0)),  # fully transparent -> white
        "la.png": Image.new("LA", (4, 3), (0, 255)),  # opaque black
        "l.png": Image.new("L", (4, 3), 100),
        "one.png": Image.new("1", (4, 3), 1),
        "i16.png": Image.new("I;16", (4, 3), 65535),
        "cmyk.jpg": Image.new("CMYK", (4, 3), (0, 0, 0, 0)),
    }
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    cases["pal.png"] = pal
    expect = {"rgba.png": (255, 255, 255), "la.png": (0, 0, 0), "l.png": (100, 100, 100), "one.png": (255, 255, 255),
              "i16.png": (255, 255, 255), "pal.png": (255, 255, 255)}
    for name, im in cases.items():
        _save(tmp_path, name, im, **({"transparency": 0} if name == "pal.png" else {}))
        out = common.load_image(tmp_path, name)
        assert out.mode == "RGB" and out.size == (4, 3), name
        if name in expect:
            assert out.getpixel((1, 1)) == expect[name], name
    assert min(common.load_image(tmp_path, "cmyk.jpg").getpixel((1, 1))) > 240  # CMYK 0 ink = white


def test_load_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert common.load_image(tmp_path, "rot.jpg").size == (2, 6)


@pytest.mark.parametrize("content, msg", [(None, "image not found"), (b"", "cannot read image"),
                                          (b"not an image at all", "cannot read image"), ("truncated", "cannot read image")])
def test_load_image_errors_name_the_path(tmp_path, content, msg):
    name = "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(common.ImageError, match=rf"{tmp_path / name}: {msg}"):
        common.load_image(tmp_path, name)


# ---- prompts ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(toy_tiny):
    model, proc = vlm.load_model(toy_tiny / "models" / "toy-llava", dtype="float32")
    return model, proc, toy_tiny / "data" / "toy" / "images"


def _with_template(proc, template):
    """A copy of the shared processor with another chat template (the fixture stays as loaded)."""
    import copy

    proc = copy.deepcopy(proc)
    proc.chat_template = template
    return proc


def _images(root, n, offset=0):
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.png"))
    return [common.load_image(root, names[offset + i]) for i in range(n)]


@pytest.mark.parametrize("question, expected", [
    ("<image>\nWhat color is the shape?", "USER: <image>\nWhat color is the shape? ASSISTANT:"),
    ("What color is the shape?\n<image>", "USER: What color is the shape?\n<image> ASSISTANT:"),
    ("What color<image>is it?", "USER: What color<image>is it? ASSISTANT:"),
    ("Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape?",
     "USER: Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape? ASSISTANT:"),
    ("Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nImage5:<image>\nIn Image5, why?",
     "USER: Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nImage5:<image>\nIn Image5, why? ASSISTANT:"),
    ("Compare <image> with <image>, then <image>.", "USER: Compare <image> with <image>, then <image>. ASSISTANT:"),
])
def test_render_prompt_keeps_images_in_place_with_the_real_llava15_template(toy, question, expected):
    proc = _with_template(toy[1], REAL_LLAVA15_TEMPLATE)
    assert vlm.render_prompt(proc, question) == expected
    prompt, response = vlm.render_pair(proc, question, "  Red. ")
    assert prompt == expected and response == " Red."


def test_the_trap_image_items_move_to_the_front(toy):
    """Why render_prompt passes one text item: image items would all be rendered first."""
    proc = _with_template(toy[1], REAL_LLAVA15_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Image1: "}, {"type": "image"},
                                         {"type": "text", "text": "Image2: "}, {"type": "image"}]}]
    naive = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert naive == "USER: <image>\n<image>\nImage1:  Image2:  ASSISTANT:"


def test_an_image_token_held_as_an_added_token_is_its_text():
    """A processor may hold its image token as a tokenizers AddedToken, not a str (str.replace refused it)."""
    from tokenizers import AddedToken

    class Processor:  # no chat template: the fallback prompt, the image token as the placeholder
        image_token, chat_template = AddedToken("<image>", normalized=False, special=True), None

    assert vlm.image_placeholder(Processor()) == "<image>"
    assert vlm.render_prompt(Processor(), "<image>\nWhat color?") == "USER: <image>\nWhat color? ASSISTANT:"


class _Placing:
    """A processor on a character tokenizer (every character id 5), the image 3 tokens of id 9, put
    where the text's <image> is, or (in_front) in front of the text whatever it says."""
    image_token, chat_template = "<image>", None

    def __init__(self, in_front=False):
        self.in_front = in_front

    def __call__(self, text, images, return_tensors):
        before, _, after = text[0].partition("<image>")
        ids = [9, 9, 9] + [5] * len(text[0]) if self.in_front else [5] * len(before) + [9, 9, 9] + [5] * len(after)
        return {"input_ids": torch.tensor([ids])}


def _model(encoder_decoder=False, image_token_id=9):
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=encoder_decoder, image_token_id=image_token_id))


def test_check_supported_refuses_what_a_decoder_only_prompt_cannot_hold():
    vlm.check_supported(_model(), _Placing())  # images where the text puts them: supported
    with pytest.raises(SystemExit, match="places images itself"):
        vlm.check_supported(_model(), _Placing(in_front=True))
    with pytest.raises(SystemExit, match="encoder-decoder"):
        vlm.check_supported(_model(encoder_decoder=True), _Placing())

    class Refusing(_Placing):  # counts the image tokens it adds itself against the images
        def __call__(self, text, images, return_tensors):
            raise ValueError("Found total 2 <image> tokens and 1 images.")

    with pytest.raises(SystemExit, match=r"refuses an image at its image token .*Found total 2"):
        vlm.check_supported(_model(), Refusing())


def test_check_supported_refuses_a_model_without_an_image_token():
    """A config naming no image token (the processor writes the image in front of the text, a position mask
    places its embeddings) is refused in one line, not a ValueError from the first stage that needs the id."""
    with pytest.raises(SystemExit, match="names no image token"):
        vlm.check_supported(_model(image_token_id=None), _Placing())


def test_toy_model_ships_the_real_llava15_template(toy_tiny):
    _, proc = vlm.load_model(toy_tiny / "models" / "toy-llava")  # fresh from disk: no other test's edits
    assert proc.chat_template == REAL_LLAVA15_TEMPLATE


@pytest.mark.parametrize("side", ["right", "left"])
def test_build_inputs_masks_prompt_and_padding(toy, side):
    model, proc, root = toy
    qs = ["<image>\nWhat color is the shape?",
          "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image3, what color is the background?"]
    ims = [_images(root, 1), _images(root, 3, 1)]
    b = vlm.build_inputs(proc, qs, ims, answers=["red", "dark gray"], padding_side=side)
    tok, img_id = proc.tokenizer, vlm.image_token_id(model)
    assert b["pixel_values"].shape[0] == 4
    for i, ans in enumerate(["red", "dark gray"]):
        kept = b["input_ids"][i][b["labels"][i] != vlm.IGNORE_INDEX]
        assert tok.decode(kept) == f" {ans}</s>"
        ids = b["input_ids"][i][b["attention_mask"][i].bool()]
        n_img = int((ids == img_id).sum())
        assert n_img == 64 * len(ims[i])  # 8x8 patches per 64 px image, CLS dropped
        prompt_ids = ids[: int(b["prompt_lens"][i])]
        gen = vlm.build_inputs(proc, [qs[i]], [ims[i]])["input_ids"][0]
        assert torch.equal(prompt_ids, gen)  # training prompt == generation prompt, token for token
    pads = b["attention_mask"] == 0
    assert (b["labels"][pads] == vlm.IGNORE_INDEX).all()


def test_build_inputs_checks_marker_count(toy):
    _, proc, root = toy
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        vlm.build_inputs(proc, ["<image><image>"], [_images(root, 1)])


# ---- tensors ------------------------------------------------------------------------------
def test_image_spans_hand_cases():
    ids = torch.tensor([[0, 0, 5, 9, 9, 7, 9, 9, 3],  # left-padded, two images
                        [5, 9, 9, 9, 9, 3, 0, 0, 0],  # two adjacent images form one run
                        [5, 3, 0, 0, 0, 0, 0, 0, 0]])  # no image
    assert vlm.image_spans(ids, 9) == [[(3, 5), (6, 8)], [(1, 5)], []]
    assert vlm.image_spans(ids, 9, n_images=[2, 2, 0]) == [[(3, 5), (6, 8)], [(1, 3), (3, 5)], []]
    with pytest.raises(ValueError, match="row 1"):
        vlm.image_spans(ids, 9, n_images=[2, 3, 0])


def test_image_spans_in_a_padded_batch(toy):
    model, proc, root = toy
    img_id = vlm.image_token_id(model)
    qs = ["Image1:<image>\nImage2:<image>\nIn Image1, why?", "<image>\nWhat?"]
    ims = [_images(root, 2), _images(root, 1, 2)]
    right = vlm.build_inputs(proc, qs, ims, padding_side="right")
    left = vlm.build_inputs(proc, qs, ims, padding_side="left")
    sr = vlm.image_spans(right["input_ids"], img_id)
    sl = vlm.image_spans(left["input_ids"], img_id)
    assert [len(s) for s in sr] == [2, 1] and all(e - s == 64 for row in sr for s, e in row)
    pad = int((left["attention_mask"][1] == 0).sum())
    assert pad > 0 and sl[0] == sr[0] and sl[1] == [(s + pad, e + pad) for s, e in sr[1]]
    for spans, ids in zip(sr, right["input_ids"]):  # the spans cover exactly the image tokens
        covered = torch.zeros_like(ids, dtype=torch.bool)
        for s, e in spans:
            covered[s:e] = True
        assert torch.equal(covered, ids == img_id)


def _naive_logps(model, batch):
    """Reference: full-vocabulary logits everywhere, then pick the labelled positions."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_lens")}
    logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (labels != vlm.IGNORE_INDEX)).sum(-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_logps_equal_naive_full_logits(toy, side):
    model, proc, root = toy
    qs = ["<image>\nWhat color is the shape?", "Image1:<image>\nImage2:<image>\nIn Image2, what color is the background?",
          "What is it?\n<image>"]
    ans = ["red", "a much longer answer than the others", "blue"]
    ims = [_images(root, 1), _images(root, 2, 1), _images(root, 1, 3)]
    b = vlm.build_inputs(proc, qs, ims, answers=ans, padding_side=side)
    with torch.no_grad():
        total, per_token, n = vlm.response_logps(model, b)
        ref = _naive_logps(model, b)
    assert torch.allclose(total, ref, atol=1e-5)
    assert torch.allclose(per_token.sum(-1), total)
    assert n.tolist() == [int((lab != -100).sum()) for lab in b["labels"]]
    for i in range(3):  # unpadded, one at a time: the same numbers (padding changes nothing)
        bi = vlm.build_inputs(proc, [qs[i]], [ims[i]], answers=[ans[i]])
        with torch.no_grad():
            assert torch.allclose(vlm.response_logps(model, bi)[0], total[i:i + 1], atol=1e-4)


def test_batched_generation_equals_one_at_a_time(toy):
    model, proc, root = toy
    qs = ["<image>\nWhat color is the shape?", "Image1:<image>\nImage2:<image>\nIn Image2, what color is the background?"]
    ims = [_images(root, 1), _images(root, 2, 1)]
    batched = vlm.generate(model, proc, qs, ims, max_new_tokens=5)
    single = [vlm.generate(model, proc, [q], [im], max_new_tokens=5)[0] for q, im in zip(qs, ims)]
    assert batched == single


def test_load_model_refuses_a_hub_id():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        vlm.load_model("llava-hf/llava-1.5-7b-hf")


def test_a_llava15_7b_hf_shaped_checkpoint_loads_and_gives_576_tokens_per_image(toy, tmp_path):
    """llava-hf/llava-1.5-7b-hf's layout and geometry (336 px, patch 14, CLS dropped -> 576
    tokens, vision_feature_layer -2, legacy `image_token_index` key, shortest-edge resize +
    centre crop), at toy width so it builds in a second."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    _, toy_proc, root = toy
    tok = toy_proc.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    LlavaForConditionalGeneration._from_config(cfg).save_pretrained(tmp_path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               do_center_crop=True, resample=3)
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=REAL_LLAVA15_TEMPLATE).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["image_token_index"] == tok.convert_tokens_to_ids("<image>")  # spelt as in the hub's config.json

    model, proc = vlm.load_model(tmp_path, dtype="float32", attn_implementation="eager")
    ims = [Image.new("RGB", (500, 300), (200, 10, 10)), Image.new("RGB", (300, 600), (10, 10, 200))]
    b = vlm.build_inputs(proc, ["Image1:<image>\nImage2:<image>\nIn Image2, what color?"], [ims], answers=["blue"])
    assert b["pixel_values"].shape == (2, 3, 336, 336)
    spans = vlm.image_spans(b["input_ids"], vlm.image_token_id(model))
    assert [e - s for s, e in spans[0]] == [576, 576]
    with torch.no_grad():
        total, _, n = vlm.response_logps(model, b)
    assert torch.isfinite(total).all() and n.tolist() == [len(tok(" blue", add_special_tokens=False)["input_ids"]) + 1]


def test_generate_reports_whether_the_answer_reached_eos(toy):
    model, proc, root = toy
    qs = ["<image>\nWhat color is the shape?", "Image1:<image>\nImage2:<image>\nIn Image2, what color is the background?"]
    ims = [_images(root, 1), _images(root, 2, 1)]
    for n in (1, 3, 8):
        texts, finished = vlm.generate(model, proc, qs, ims, max_new_tokens=n, return_finished=True)
        assert texts == vlm.generate(model, proc, qs, ims, max_new_tokens=n)
        for i in range(2):  # reference: this row alone, EOS looked for in the raw new tokens
            b = vlm.build_inputs(proc, [qs[i]], [ims[i]])
            with torch.no_grad():
                new = model.generate(**b, do_sample=False, max_new_tokens=n)[0, b["input_ids"].shape[1]:]
            assert finished[i] == (proc.tokenizer.eos_token_id in new.tolist())


# ---- long loops ------------------------------------------------------------------------------
def test_progress_writes_lines_to_a_log_and_nothing_between_intervals():
    import io

    log = io.StringIO()  # not a terminal, like a cluster job's stdout
    with common.Progress(40, "04 pairs", every=0, stream=log) as bar:
        for _ in range(4):
            bar.update(10, pairs=3)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("04 pairs: 40/40 rows (100.0%) | ")
    assert "rows/s | ETA 0m00s | pairs 3" in lines[-1] and "ETA" in lines[0]
    quiet = io.StringIO()
    with common.Progress(40, "07 base", every=3600, stream=quiet) as bar:
        bar.update(40)
    assert quiet.getvalue() == ""  # within the interval: silent, never a line per item


def test_resume_file_keeps_finished_records_drops_a_torn_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "out.jsonl.partial"
    f = common.ResumeFile(path, {"seed": 1}, key="i")
    f.add([{"i": 0, "x": "a"}, {"i": 1, "x": "b"}])
    f.add([{"i": 2, "x": "c"}])
    with open(path, "a") as h:
        h.write('{"i": 3, "x": "tor')  # the write a kill interrupted
    again = common.ResumeFile(path, {"seed": 1}, key="i")
    assert again.done == {0: {"i": 0, "x": "a"}, 1: {"i": 1, "x": "b"}, 2: {"i": 2, "x": "c"}}
    again.keep([0, 1])  # e.g. only whole batches
    assert common.ResumeFile(path, {"seed": 1}, key="i").done.keys() == {0, 1}
    with pytest.raises(SystemExit, match="other inputs or settings"):
        common.ResumeFile(path, {"seed": 2}, key="i")
    path.write_text('{"resume": {"seed": 1}}\n{broken\n{"i": 5}\n')
    with pytest.raises(SystemExit, match=r"out.jsonl.partial:2: corrupt line"):
        common.ResumeFile(path, {"seed": 1}, key="i")
    again.remove()
    assert not path.exists()
