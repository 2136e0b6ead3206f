"""06_train_dpo.py against TRL's DPOTrainer on Qwen2.5-VL (the tiny random-weight checkpoint of
tests/tiny_families.py: the real Qwen2_5_VLForConditionalGeneration, processor and chat template),
as tests/test_train_dpo.py::test_first_steps_equal_trl_dpotrainer does for the toy LLaVA.

How TRL 1.16 builds a Qwen2.5-VL batch (trl/trainer/dpo_trainer.py, DataCollatorForVisionPreference):
the prompt goes through the processor with the images (left-padded, add_special_tokens=False), each
completion through it as text alone, then [prompt | completion] is flushed left; image_grid_thw,
pixel_values and mm_token_type_ids (zeros over the completion) are the prompt's. A vision dataset
skips _prepare_dataset, so no EOS is appended to a completion. The model computes its M-RoPE
positions itself, from input_ids + mm_token_type_ids + image_grid_thw + attention_mask, in both.

Under which format the tokens agree: the standard (non-conversational) format with our rendered
prompt and vlm.render_pair's responses ("blue<|im_end|>"). Qwen's tokenizer has no BOS and its
EOS is the template's end-of-turn token, so, unlike the LLaVA test, nothing is written out.

The one difference: TRL's conversational format (its chat-template path, even with the images
kept in place as content items) takes a completion as the template's text after the prompt,
"blue<|im_end|>\\n", and so also scores the newline the template writes after the end-of-turn
token. Ours stops at <|im_end|>, and that is the right one: generation stops at <|im_end|>
(generation_config.eos_token_id), so the "\\n" is never sampled; scoring it puts a log-prob the
policy never acts on into both sides of the DPO margin and trains a token no answer contains.
"""
import importlib
import json

import pytest
import torch
from PIL import Image

import common
import vlm
import train_state
from conftest import recording_trl_trainer
from tiny_families import tiny_dirs  # noqa: F401  (a fixture)

dpo = importlib.import_module("06_train_dpo")
pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30), "yellow": (220, 220, 40)}
SIZES = [(64, 48), (40, 64), (56, 56), (48, 48)]  # unequal: unequal image grids and token counts
ROWS = [  # (images, target image, chosen, rejected): answers of different lengths on both sides
    (["red", "blue"], 2, "blue", "It is red."),
    (["green", "yellow", "red"], 1, "The shape is green.", "yellow"),
    (["blue", "green"], 1, "blue", "green, I think"),
    (["yellow", "red", "blue"], 3, "It is blue.", "red"),
]


@pytest.fixture(scope="module")
def qwen(tiny_dirs, tmp_path_factory):  # noqa: F811
    """The tiny Qwen2.5-VL, 4 pairs of 2-3 coloured PNGs and the pairs file 06 reads."""
    root = tmp_path_factory.mktemp("qwen_pairs")
    for (name, rgb), size in zip(COLOURS.items(), SIZES):
        Image.new("RGB", size, rgb).save(root / f"{name}.png")
    rows = []
    for i, (ims, t, chosen, rejected) in enumerate(ROWS):
        labels = "".join(f"Image{j + 1}:<image>\n" for j in range(len(ims)))
        rows.append({"id": f"pair-{i}", "image": [f"{c}.png" for c in ims],
                     "prompt": f"{labels}In Image{t}, what color is the shape?", "chosen": chosen, "rejected": rejected})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tiny_dirs("qwen2_5_vl")
    model, proc = vlm.load_model(model_dir, dtype="float32")
    return {"dir": model_dir, "images": root, "pairs": pairs, "rows": rows, "model": model, "proc": proc}


def trl_example(q, r):
    """TRL's standard format as 05 exports it (05_post_select.to_trl): our rendered prompt, our
    responses (they end with <|im_end|> = EOS; Qwen's tokenizer adds no BOS)."""
    (e,) = importlib.import_module("05_post_select").to_trl([r], q["proc"], q["images"])
    prompt, chosen = vlm.render_pair(q["proc"], r["prompt"], r["chosen"])
    assert (e["prompt"], e["chosen"]) == (prompt, chosen)  # nothing added for Qwen
    return {**{k: e[k] for k in ("prompt", "chosen", "rejected")},
            "images": [common.load_image(q["images"], p) for p in r["image"]]}


def trl_conversational(q, r):
    """TRL's conversational format, every image an item in place (its string-content form would
    put all images before the text, see trl.data_utils.prepare_multimodal_messages)."""
    parts, content = r["prompt"].split(common.MARKER), []
    for k, text in enumerate(parts):
        content += [{"type": "text", "text": text}] if text else []
        content += [{"type": "image"}] if k < len(parts) - 1 else []
    return {"prompt": [{"role": "user", "content": content}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "images": [common.load_image(q["images"], p) for p in r["image"]]}


def ours(q):
    pairs, _ = dpo.load_pairs(q["pairs"], q["images"], q["proc"], 4096, "raise")
    return dpo.collate(pairs, q["images"], q["proc"], q["model"])


def rope(model, b):
    """(3, 2B, T) M-RoPE positions the model computes for a batch (temporal, height, width)."""
    return model.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"],
                                      attention_mask=b["attention_mask"])[0]


def assert_same_tokens(model, theirs, ours_):
    """Row by row on attended positions (padding aside): tokens, scored positions, token types,
    M-RoPE positions; images exactly."""
    t_pos, o_pos = rope(model, theirs), rope(model, ours_)
    for i in range(ours_["input_ids"].shape[0]):
        t, o = theirs["attention_mask"][i].bool(), ours_["attention_mask"][i].bool()
        assert theirs["input_ids"][i][t].tolist() == ours_["input_ids"][i][o].tolist(), i
        assert theirs["completion_mask"][i][t].bool().tolist() == (ours_["labels"][i][o] != -100).tolist(), i
        assert theirs["mm_token_type_ids"][i][t].tolist() == ours_["mm_token_type_ids"][i][o].tolist(), i
        assert torch.equal(t_pos[:, i][:, t], o_pos[:, i][:, o]), i
    assert torch.equal(theirs["pixel_values"], ours_["pixel_values"])
    assert torch.equal(theirs["image_grid_thw"], ours_["image_grid_thw"])


def test_trl_vision_collator_builds_our_qwen_tokens_and_scores_one_newline_more_when_conversational(qwen):
    """Standard format: TRL's collated batch == ours token by token, M-RoPE positions included.
    Conversational format: the same prompt tokens, and every completion one token longer, the
    template's "\\n" after <|im_end|>, scored (module docstring: ours is the right one)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model, proc = qwen["model"], qwen["proc"]
    tok = proc.tokenizer
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>"  # nothing to write out for TRL
    collator = DataCollatorForVisionPreference(processor=proc)
    theirs, mine = collator([trl_example(qwen, r) for r in qwen["rows"]]), ours(qwen)
    assert_same_tokens(model, theirs, mine)
    # the responses end at the end-of-turn token, once: TRL appended no second EOS
    for i in range(8):
        scored = tok.convert_ids_to_tokens(mine["input_ids"][i][mine["labels"][i] != -100])
        assert scored[-1] == "<|im_end|>" and scored.count("<|im_end|>") == 1, scored
    # M-RoPE is really at work: image tokens share positions, so each row ends below its length
    pos, n = rope(model, mine), mine["attention_mask"].sum(1)
    assert (pos[0].max(1).values < n - 1).all()
    with torch.no_grad():  # and matters: 1-D positions move the log-probs (by ~2e-4 in this tiny model)
        flat = torch.arange(n.max()).expand_as(mine["input_ids"])
        gap = (vlm.response_logps(model, mine)[0] - vlm.response_logps(model, {**mine, "position_ids": flat})[0])
    assert gap.abs().max() > 1e-4

    conv = collator([trl_conversational(qwen, r) for r in qwen["rows"]])
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    for i in range(8):
        t, o = conv["attention_mask"][i].bool(), mine["attention_mask"][i].bool()
        c_ids, o_ids = conv["input_ids"][i][t].tolist(), mine["input_ids"][i][o].tolist()
        assert c_ids == o_ids + [newline], i  # same prompt, same answer, + "\n" after <|im_end|>
        assert conv["completion_mask"][i][t].tolist() == (mine["labels"][i][o] != -100).tolist() + [1], i
    assert torch.equal(conv["pixel_values"], mine["pixel_values"])  # images in place, as ours


def test_first_steps_equal_trl_dpotrainer_on_qwen2_5_vl(qwen, tmp_path):
    """Same tiny Qwen2.5-VL, same 4 pairs (one global batch, so every step sees all of them in
    both), full fine-tune of every weight (vision tower and merger included: TRL trains whatever
    the loaded model leaves trainable, i.e. all), AdamW, linear schedule, clipping: loss, rewards
    and log-probs of 3 steps agree to 1e-5, after checking TRL builds exactly our tokens. 1e-5,
    not the LLaVA test's 1e-4: 1-D positions instead of M-RoPE move these log-probs by ~2e-4."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    ds = datasets.Dataset.from_list([trl_example(qwen, r) for r in qwen["rows"]])
    trainer, seen = recording_trl_trainer(qwen["dir"], ds, qwen["proc"], tmp_path / "trl")
    assert isinstance(trainer.data_collator, DataCollatorForVisionPreference)
    assert_same_tokens(qwen["model"], trainer.data_collator([ds[i] for i in range(4)]), ours(qwen))
    assert all(p.requires_grad for p in trainer.model.parameters())  # TRL: every weight

    trainer.train()
    out = tmp_path / "ours"
    args = dpo.get_args(["--pairs", str(qwen["pairs"]), "--image-root", str(qwen["images"]), "--model", str(qwen["dir"]),
                         "--out", str(out), "--recipe", "paper", "--dtype", "float32", "--no-grad-ckpt", "--no-merge",
                         "--batch-size", "4", "--grad-accum", "1", "--lora-r", "0", "--tune-vision", "--tune-projector",
                         "--ref-logps", "recompute", "--max-steps", "3", "--lr", "1e-4", "--max-grad-norm", "1.0",
                         "--warmup-steps", "0", "--save-every", "0", "--threads", "1"])
    policy, _ = train_state.prepare_policy(vlm.load_model(qwen["dir"], dtype="float32")[0], "frozen-copy", lora_r=0,
                                           tune_vision=True, tune_projector=True)
    assert all(p.requires_grad for p in policy.parameters())  # ours with these flags: every weight too
    dpo.main(args)
    log = [r for _, r in common.read_rows(out / "log.jsonl")]
    meta = json.loads((out / "log.jsonl.meta.json").read_text())
    # the fast path's prefix-shared rows (M-RoPE positions re-laid); images not encoded once: the tower is trained
    assert meta["reference"] == "frozen-copy" and meta["args"]["prefix_sharing"] is True
    assert len(seen) == len(log) == 3
    for t, o in zip(seen, log):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5)
        assert o["reward_chosen"] == pytest.approx(t["rewards/chosen"], abs=1e-5)
        assert o["reward_rejected"] == pytest.approx(t["rewards/rejected"], abs=1e-5)
        assert o["logps_chosen"] == pytest.approx(t["logps/chosen"], abs=1e-5)
        assert o["logps_rejected"] == pytest.approx(t["logps/rejected"], abs=1e-5)
    assert abs(log[2]["loss"] - log[0]["loss"]) > 1e-3  # it moved
