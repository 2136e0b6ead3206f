"""prefix_sharing.py, 06_train_dpo.py's fast path: prefix-shared pairs and images encoded once give
the plain path's log-probs and gradients, fp32, tiny toy model, 1-5 images per prompt, a padded
batch of unequal lengths; the first-batch self-check; a training run logs the plain losses. On
tests/tiny_families.py checkpoints: Qwen2.5-VL's re-laid M-RoPE positions and Gemma 3's
per-layer-type masks (window in positions, image blocks) token by token."""
import importlib
import random

import pytest
import torch

import prefix_sharing
import train_state
import vlm
from conftest import make_pairs, run_main, write

dpo = importlib.import_module("06_train_dpo")
TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_tiny):
    return {"root": toy_tiny, "model": toy_tiny / "models" / "toy-llava", "images": toy_tiny / "data" / "toy" / "images"}


def uneven_pairs(toy_root):
    """Five pairs with 1..5 images (prompts of unequal length) and answers of unequal length
    (chosen longer in some pairs, rejected in others)."""
    rng, out = random.Random(1), []
    for k in range(1, 6):
        p = make_pairs(toy_root, 1, seed=k, n_images=(max(k, 2),))[0]
        if k == 1:  # one image: keep the first, rewrite the labels
            p["image"], p["prompt"] = p["image"][:1], "Image1:<image>\nIn Image1, what color is the shape?"
        p["chosen"] += " It is the only shape." * rng.randrange(3)
        p["rejected"] = f"I think it is {p['rejected']}." + " The background is plain." * rng.randrange(3)
        out.append({"id": p["id"] + f"-{k}", "images": p["image"], "prompt": p["prompt"],
                    "chosen": p["chosen"], "rejected": p["rejected"]})
    return out


def logps_and_grads(policy, model, batch):
    """Policy and reference (adapters disabled) summed log-probs, and the gradients of the summed
    DPO loss w.r.t. the trainable parameters."""
    policy.zero_grad(set_to_none=True)
    with torch.no_grad(), policy.disable_adapter():
        rc, rr, _, _ = dpo.score(model, batch)
    pc, pr, nc, nr = dpo.score(model, batch)
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.requires_grad}
    return torch.cat([pc, pr]).detach(), torch.cat([rc, rr]), torch.cat([nc, nr]), grads


@pytest.mark.parametrize("attn,prefix,encode", [("sdpa", True, False), ("eager", True, False),
                                               ("sdpa", True, True), ("sdpa", False, True)])
def test_fast_paths_equal_plain_logps_and_grads(toy, attn, prefix, encode):
    model, proc = vlm.load_model(toy["model"], dtype="float32", attn_implementation=attn)
    torch.manual_seed(0)
    policy, _ = train_state.prepare_policy(model, "adapters-disabled", lora_r=8, lora_alpha=16)
    for name, p in policy.named_parameters():  # LoRA B starts at 0: make policy != reference
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    pairs = uneven_pairs(toy["root"])
    plain = dpo.collate(pairs, toy["images"], proc, model)
    fast = prefix_sharing.build_shared_prefix_batch(plain, torch.float32) if prefix else plain
    if prefix:  # the shared layout really is shorter: one prompt per pair, padded batch of unequal rows
        assert fast["input_ids"].shape[0] == len(pairs) and plain["input_ids"].shape[0] == 2 * len(pairs)
        assert fast["input_ids"].numel() < plain["input_ids"].numel()
        assert fast["pixel_values"].shape[0] == sum(len(p["images"]) for p in pairs)
    if encode:
        fast = prefix_sharing.encode_images(model, fast)
        assert "pixel_values" not in fast and "mm_encoder_outputs" in fast
    pol_a, ref_a, n_a, g_a = logps_and_grads(policy, model, plain)
    pol_b, ref_b, n_b, g_b = logps_and_grads(policy, model, fast)
    assert torch.equal(n_a, n_b)
    torch.testing.assert_close(pol_b, pol_a, atol=TOL, rtol=0)
    torch.testing.assert_close(ref_b, ref_a, atol=TOL, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in g_a.values())  # the comparison is not vacuous
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], atol=TOL, rtol=0, msg=lambda m: f"{k}: {m}")


def test_shared_prefix_mask_and_positions(toy):
    """One pair laid out by hand: rejected sees the prompt and itself, never the chosen answer;
    its positions restart at the prompt end; the first rejected token is scored from p-1."""
    model, proc = vlm.load_model(toy["model"])
    pair = uneven_pairs(toy["root"])[0]
    plain = dpo.collate([pair], toy["images"], proc, model)
    fast = prefix_sharing.build_shared_prefix_batch(plain, torch.float32)
    p = int(plain["prompt_lens"][0])
    c, r = [int(m.sum()) - p for m in plain["attention_mask"]]
    allowed = fast["attention_mask"][0, 0] == 0  # (T, T)
    assert allowed.shape == (p + c + r, p + c + r)
    assert allowed[p + c:, :p].all() and not allowed[p + c:, p:p + c].any()
    assert torch.equal(allowed[p + c:, p + c:], torch.ones(r, r, dtype=torch.bool).tril())
    assert torch.equal(fast["position_ids"][0], torch.cat([torch.arange(p + c), torch.arange(p, p + r)]))
    src = fast["score_src"].tolist()
    assert src[:c] == list(range(p - 1, p + c - 1)) and src[c] == p - 1 and src[c + 1:] == list(range(p + c, p + c + r - 1))


def test_default_fast_training_run_logs_the_plain_losses(toy, tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", make_pairs(toy["root"], 4, n_images=(1, 3)))
    toy = {**toy, "pairs": pairs}
    args = dpo.get_args([])
    assert args.prefix_sharing and args.encode_images_once  # the fast path is the default
    plain = run_main(toy, tmp_path / "plain", "--max-steps", "2", "--batch-size", "2", "--no-prefix-sharing",
                     "--no-encode-images-once")
    fast = run_main(toy, tmp_path / "fast", "--max-steps", "2", "--batch-size", "2")
    assert len(plain) == len(fast) == 2
    for a, b in zip(plain, fast):
        assert abs(a["loss"] - b["loss"]) < TOL and abs(a["logps_chosen"] - b["logps_chosen"]) < TOL


def test_self_check_passes_the_exact_layout_and_stops_a_wrong_one(toy, monkeypatch):
    """The first-batch check 06 runs before training: the layout as built agrees with the plain
    rows; one whose rejected positions run on after the chosen answer (a plain concatenation's
    positions) gives other log-probs and stops the run. (An absolute tolerance of 1e-3 here: in
    the tiny model the wrong positions move the summed log-probs by ~2e-3, which 06's default
    tolerance, 1e-4 relative + 1e-3, lets through.)"""
    model, proc = vlm.load_model(toy["model"], dtype="float32")
    scorer, _ = train_state.make_scorers(model, None, dpo.score, fsdp=False, world=1)
    plain = dpo.collate(uneven_pairs(toy["root"]), toy["images"], proc, model)
    assert prefix_sharing.self_check(scorer, model, plain) < TOL
    assert prefix_sharing.self_check(scorer, model, plain, tol=(0, 1e-3)) < TOL
    real = prefix_sharing.build_shared_prefix_batch

    def positions_run_on(batch, dtype):
        out = real(batch, dtype)
        return {**out, "position_ids": torch.arange(out["input_ids"].shape[1]).expand_as(out["input_ids"])}

    monkeypatch.setattr(prefix_sharing, "build_shared_prefix_batch", positions_run_on)
    with pytest.raises(SystemExit, match="fast path's log-probs differ from the plain path's"):
        prefix_sharing.self_check(scorer, model, plain, tol=(0, 1e-3))


# ---- M-RoPE positions and per-layer-type masks (tests/tiny_families.py checkpoints) ---------------
from tiny_families import tiny_dirs  # noqa: E402,F401  (a fixture)
from test_families import PAIRS  # noqa: E402  (1-3 images per prompt, answers of unequal length)


@pytest.fixture(scope="module")
def family_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("family_images")
    for i, (size, colour) in enumerate([((64, 48), (200, 30, 30)), ((40, 64), (30, 30, 200)), ((56, 56), (30, 200, 30))]):
        Image.new("RGB", size, colour).save(root / f"im{i}.png")
    return root


def test_m_rope_positions_are_each_tokens_plain_row_positions(tiny_dirs, family_images):  # noqa: F811
    """Qwen2.5-VL: prompt + chosen carry the chosen row's (t, h, w) positions, rejected the rejected
    row's from the prompt's end on, as the model's own get_rope_index gives them for the plain rows."""
    model, proc = vlm.load_model(tiny_dirs("qwen2_5_vl"), dtype="float32")
    plain = dpo.collate(PAIRS, family_images, proc, model)
    fast = prefix_sharing.lay_out(model, plain, encode_once=False)
    want = model.model.get_rope_index(plain["input_ids"], plain["mm_token_type_ids"], plain["image_grid_thw"],
                                      attention_mask=plain["attention_mask"])[0]  # (3, 2B, T0)
    B = len(PAIRS)
    for i in range(B):
        p, (c_end, r_end) = int(plain["prompt_lens"][i]), (int(plain["attention_mask"][i].sum()),
                                                           int(plain["attention_mask"][B + i].sum()))
        got = fast["position_ids"][:, i]
        assert torch.equal(got[:, :c_end], want[:, i, :c_end])
        assert torch.equal(got[:, c_end:c_end + r_end - p], want[:, B + i, p:r_end])
        assert (want[:, i, :p] != torch.arange(p)).any()  # M-RoPE really at work: image tokens share positions
    scorer, _ = train_state.make_scorers(model, None, dpo.score, fsdp=False, world=1)
    assert prefix_sharing.self_check(scorer, model, plain) < TOL


def test_the_sliding_window_is_measured_in_positions_not_shared_row_indices(tiny_dirs, family_images):  # noqa: F811
    """Gemma 3 (window 16): a rejected query sees a prompt key exactly when their distance in the
    rejected row is under the window, though in the shared row c more indices lie between them;
    image tokens of one image see each other both ways; chosen keys stay hidden from rejected queries."""
    model, proc = vlm.load_model(tiny_dirs("gemma3"), dtype="float32")
    W = model.config.get_text_config().sliding_window
    plain = dpo.collate(PAIRS, family_images, proc, model)
    fast = prefix_sharing.lay_out(model, plain, encode_once=False)
    B, i = len(PAIRS), 2  # three images
    p, c_end, r_end = int(plain["prompt_lens"][i]), int(plain["attention_mask"][i].sum()), int(plain["attention_mask"][B + i].sum())
    c, r = c_end - p, r_end - p
    sliding = fast["attention_mask"]["sliding_attention"][i, 0] == 0  # (T, T)
    full = fast["attention_mask"]["full_attention"][i, 0] == 0
    assert p > W and c > 0
    for j in range(r):  # rejected token j: plain position p + j, shared index c_end + j
        sees = sliding[c_end + j, :p].nonzero().flatten().tolist()
        assert sees == [k for k in range(p) if k > p + j - W], j
        assert not sliding[c_end + j, p:c_end].any() and not full[c_end + j, p:c_end].any()
    image = (plain["token_type_ids"][i, :p] == 1).nonzero().flatten()  # 3 images x 4 tokens
    first = image[0]  # the first image's first token sees the whole of its image, not the next image
    assert len(image) == 12 and full[first, image[:4]].all() and not full[first, image[4:]].any()
    scorer, _ = train_state.make_scorers(model, None, dpo.score, fsdp=False, world=1)
    assert prefix_sharing.self_check(scorer, model, plain) < TOL
