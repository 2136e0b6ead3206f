"""
06_train_dpo.py — stage 6: preference pairs -> a DPO-aligned vision-language model.
in : pairs JSONL (04/05) + image root + local model dir
out: OUT/log.jsonl (+ .meta.json), OUT/checkpoints/step-NNNNNN/, OUT/adapter/ (LoRA), OUT/final/ (merged or full)
  python 06_train_dpo.py                                  # toy: data/toy/pairs.post.jsonl on models/toy-llava, toy recipe
  python 06_train_dpo.py --max-steps 40 --plot            # ... and draw OUT/curves.png
  torchrun --nproc_per_node 2 06_train_dpo.py             # DDP: gloo on CPU, nccl on GPU, same losses
  python 06_train_dpo.py --resume auto                    # continue from OUT's latest checkpoint

The paper's LLaVA-1.5 recipe (8 GPUs x 1 pair x 8 accumulation = 64 pairs per step, 3 epochs):
  torchrun --nproc_per_node 8 06_train_dpo.py --model llava-1.5-7b-hf --pairs pairs.jsonl \\
      --image-root /data --out out/mia-dpo-llava15 --recipe paper --dtype bfloat16 --grad-ckpt \\
      --lora-r 128 --lora-alpha 256 --beta 0.1 --gamma 0 --lr 5e-5 --warmup-ratio 0.1 \\
      --batch-size 1 --grad-accum 8 --epochs 3 --merge

Recipes: flags you do not set come from a recipe, printed at the start and kept in the sidecar.
`--recipe auto` (the default) takes `toy` for a model 00 built and `paper` for any other, so a
real checkpoint never gets the toy's full fine-tune at lr 2e-4. RECIPES below lists both.

Read this file top to bottom:
  1. the loss          dpo_loss (DPO / IPO / conservative DPO), mia_dpo_loss (+ SFT term) and
                       replay_loss (single-image rows the base was tuned on; the toy recipe's)
  2. the log-probs     concatenated_forward: chosen and rejected rows of a batch in ONE forward
  3. one step          dpo_step: log-probs -> loss and the numbers the log shows
  4. the fast path     same numbers, ~2x: [prompt | chosen | rejected] rows under a block mask
                       (the prompt and its images run once per pair), the frozen vision tower run
                       once per step, the reference log-probs 04 stored (no reference forward).
                       On by default; --no-prefix-sharing --no-encode-images-once is section 2.
  5. plumbing          pairs, reference, data order, distributed, checkpoints, logs, main
The reference is, in this order of preference: the log-probs 04 stored in the pairs (only when
their fingerprint matches the loaded model), the model with its LoRA adapters disabled, or a
frozen copy (full fine-tuning). Data order is a function of (seed, step) alone: a resumed run,
and a run on N processes with the same global batch, see the same pairs at every step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import common
import vlm

# ==== 1. the loss (the method: edit me) =========================================================
RECIPES = {  # flags a run does not set; `auto` picks toy for a model 00 built, paper otherwise
    "toy": {  # chosen on the toy's dev split (README "What the toy shows"): full fine-tune, SFT term, replay
        "lora_r": 0, "lora_alpha": 256, "lr": 2e-4, "gamma": 1.0, "epochs": 6, "batch_size": 16, "grad_accum": 1,
        "dtype": "float32", "grad_ckpt": False, "save_every": 0, "merge": False,
        "replay": "auto", "replay_weight": 1.0},  # auto: the toy world's train.json beside --pairs
    "paper": {  # LLaVA-1.5 7B: LoRA r 128 / alpha 256, pure DPO, bf16; 1 pair x 8 accumulation per GPU
        "lora_r": 128, "lora_alpha": 256, "lr": 5e-5, "gamma": 0.0, "epochs": 3, "batch_size": 1, "grad_accum": 8,
        "dtype": "bfloat16", "grad_ckpt": True, "save_every": 100, "merge": True,
        "replay": "none", "replay_weight": 0.0},
}


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_n_tokens=None, rejected_n_tokens=None):
    """Per-pair DPO loss and implicit rewards.

    All inputs: (B,) summed log-probs of the chosen / rejected response under policy / reference;
    n_tokens (B,): their lengths, used by IPO only.
    returns   : (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), reward = beta * log-ratio.
      h = (pc - rc) - (pr - rr)                                   (log-ratio difference)
      sigmoid (DPO, Rafailov et al. 2023, eq. 7):  -(1-e) log sig(beta h) - e log sig(-beta h)
               e = label_smoothing: conservative DPO, the chosen label is wrong with probability e
      ipo     (Azar et al. 2023, eq. 17):          (h - 1 / (2 beta))^2, on log-probs averaged
               over each response's tokens (as IPO's authors and TRL do) when n_tokens are given
    Worked example: policy == reference -> h = 0 -> loss log 2 = 0.6931, rewards 0. With
    pc, pr, rc, rr = -1, -3, -2, -2 and beta 0.1: rewards 0.1 and -0.1, h = 2,
    loss = -log sig(0.2) = 0.5981.
    """
    import torch.nn.functional as F

    if loss_type == "ipo" and chosen_n_tokens is not None:  # subtle: per-token averages, not sums
        nc, nr = chosen_n_tokens.clamp(min=1), rejected_n_tokens.clamp(min=1)
        policy_chosen_logps, ref_chosen_logps = policy_chosen_logps / nc, ref_chosen_logps / nc
        policy_rejected_logps, ref_rejected_logps = policy_rejected_logps / nr, ref_rejected_logps / nr
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid or ipo)")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def mia_dpo_loss(dpo_losses, policy_chosen_logps, chosen_n_tokens, dpo_alpha: float = 1.0, gamma: float = 0.0):
    """The paper's objective per pair: dpo_alpha * DPO + gamma * SFT, SFT = the chosen response's
    mean token negative log-likelihood. All inputs (B,) -> (B,). Paper (LLaVA-1.5): alpha 1, gamma 0.
    Example: DPO 0.69, chosen log-prob -6 over 3 tokens, gamma 0.5 -> 0.69 + 0.5 * 2 = 1.69."""
    return dpo_alpha * dpo_losses + gamma * (-policy_chosen_logps / chosen_n_tokens.clamp(min=1))


def replay_loss(replay_logps, replay_n_tokens, weight: float = 0.0):
    """The replay term (not in the paper; the toy recipe's): weight x the mean token NLL of the
    answer of a single-image row the base was tuned on, per row (K,) -> (K,). Added to the mean
    pair loss once per micro-step, like PPO-ptx's pretraining mix (Ouyang et al. 2022), so that
    training on multi-image pairs does not unlearn single images.
    Example: an answer of 2 tokens + EOS at log-prob -1.5 in all, weight 1 -> 0.5."""
    return weight * (-replay_logps / replay_n_tokens.clamp(min=1))


# ==== 2. the log-probs: chosen and rejected in one forward =======================================
def collate(pairs, image_root, processor, device, dtype):
    """B pairs -> one batch of 2B rows, chosen rows first, then rejected: each row is the prompt
    (the model's chat template, images in place) + the answer + EOS, labels on answer + EOS only
    (vlm.build_inputs, the same function 04 and 07 build prompts with)."""
    images = [[common.load_image(image_root, rel) for rel in p["images"]] for p in pairs]
    answers = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return on_device(vlm.build_inputs(processor, [p["prompt"] for p in pairs] * 2, images * 2, answers=answers), device, dtype)


def on_device(batch, device, dtype):
    """A build_inputs batch on `device`, pixel values in the weights' dtype."""
    batch = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def concatenated_forward(model, batch):
    """A collate() batch -> (policy_chosen_logps, policy_rejected_logps, chosen_n_tokens,
    rejected_n_tokens), each (B,): summed log-probs of each answer + EOS given its prompt and
    images, and how many tokens were scored. One forward over all 2B rows."""
    summed, _, n_tokens = vlm.response_logps(model, batch)  # (2B,), LM head only at labelled positions
    chosen_logps, rejected_logps = summed.float().chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_n, rejected_n


# ==== 3. one step ================================================================================
def dpo_step(scorer, batch, ref_chosen_logps, ref_rejected_logps, args):
    """One micro-batch: policy log-probs (scorer = a forward like concatenated_forward), the loss
    -> (loss (B,) to back-propagate, the numbers the log shows per pair)."""
    policy_chosen_logps, policy_rejected_logps, chosen_n, rejected_n = scorer(batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps.float(), ref_rejected_logps.float(),
        args.beta, args.loss, args.label_smoothing, chosen_n, rejected_n)
    loss = mia_dpo_loss(losses, policy_chosen_logps, chosen_n, args.dpo_alpha, args.gamma)
    numbers = {"loss": loss, "reward_chosen": chosen_rewards, "reward_rejected": rejected_rewards,
               "logps_chosen": policy_chosen_logps, "logps_rejected": policy_rejected_logps,
               "ref_logps_chosen": ref_chosen_logps, "ref_logps_rejected": ref_rejected_logps}
    return loss, numbers


# ==== 4. the fast path: same numbers, ~2x ========================================================
# (a) prefix sharing: one row [prompt | chosen | rejected] per pair, so the prompt and its images
#     run once per pair instead of twice; (b) images encoded once per step: the frozen vision
#     tower's features are reused by chosen, rejected and the reference; (c) the reference
#     log-probs 04 stored with the pairs replace the reference forward (section 5, reference_logps).
#     tests/test_train_dpo_fast.py checks log-probs and gradients against section 2 (1e-4).
def build_shared_prefix_batch(batch, dtype):
    """Plain batch of 2B rows [chosen; rejected] (collate, right-padded) -> B rows
    `[prompt | chosen | rejected]`, so each prompt and its images go through the model once.

    in : input_ids, attention_mask (2B, T0), labels (2B, T0), prompt_lens (2B,), pixel_values
         (2 x n_img, C, H, W: chosen rows' images first, then the same images again)
    out: input_ids (B, T)  with T = max(p + c + r), right-padded
         position_ids (B, T): prompt 0..p-1, chosen p..p+c-1, rejected p..p+r-1 (subtle: rejected
              continues from the prompt end, as if the chosen answer were not there)
         attention_mask (B, 1, T, T) additive (0 = attend, dtype min = blocked), causal in row
              order with one hole: rejected queries do not see chosen keys. Padding keys are
              blocked; a padding query sees only itself (a fully blocked row would be NaN in SDPA
              and poison the backward). Drawn for p=2, c=2, r=2 (x = attend):
                    P P C C R R
                  P x . . . . .
                  P x x . . . .
                  C x x x . . .
                  C x x x x . .
                  R x x . . x .
                  R x x . . x x
         pixel_values: the first half only (each pair's images once)
         score_src (N,) flat index into (B*T) of the hidden state that predicts score_tgt (N,),
         score_row (N,) its output row in [chosen; rejected] order (0..2B-1); N = all answer tokens.
    A 4-D mask goes through transformers 5's masking_utils untouched (`_preprocess_mask_arguments`
    returns it as-is), and an additive float mask is what both eager (`weights + mask`) and SDPA take.
    """
    import torch

    ids, labels, plens = batch["input_ids"], batch["labels"], batch["prompt_lens"].tolist()
    B = ids.shape[0] // 2
    lens = batch["attention_mask"].sum(-1).tolist()  # (2B,) real tokens per plain row
    rows, segs, poss, src, tgt, out_row = [], [], [], [], [], []
    for i in range(B):
        p, c_end, r_end = plens[i], lens[i], lens[B + i]
        if plens[B + i] != p or not torch.equal(ids[i, :p], ids[B + i, :p]):
            raise ValueError(f"pair {i}: chosen and rejected rows do not share their prompt tokens")
        c, r = c_end - p, r_end - p
        rows.append(torch.cat([ids[i, :c_end], ids[B + i, p:r_end]]))  # (p + c + r,)
        segs.append(torch.tensor([1] * p + [2] * c + [3] * r))
        poss.append(torch.cat([torch.arange(c_end), torch.arange(p, r_end)]))
        # position t predicts token t+1; the first rejected token is predicted from the last
        # prompt position p-1, exactly like the first chosen token (subtle).
        c_src = list(range(p - 1, p + c - 1))
        r_src = [p - 1] + list(range(p + c, p + c + r - 1))
        keep_c = (labels[i, p:c_end] != vlm.IGNORE_INDEX).tolist()
        keep_r = (labels[B + i, p:r_end] != vlm.IGNORE_INDEX).tolist()
        src.append([s for s, k in zip(c_src, keep_c) if k] + [s for s, k in zip(r_src, keep_r) if k])
        tgt.append(torch.cat([ids[i, p:c_end][torch.tensor(keep_c, dtype=torch.bool)],
                              ids[B + i, p:r_end][torch.tensor(keep_r, dtype=torch.bool)]]))
        out_row.append([i] * sum(keep_c) + [B + i] * sum(keep_r))
    T = max(len(x) for x in rows)
    dev = ids.device
    padded = ids[batch["attention_mask"] == 0]  # the tokenizer's pad id, or any non-image token
    pad = int(padded[0]) if padded.numel() else int(ids[0, plens[0]])
    input_ids = torch.full((B, T), pad, dtype=ids.dtype, device=dev)
    seg = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    for i, (x, s, q) in enumerate(zip(rows, segs, poss)):
        input_ids[i, :len(x)], seg[i, :len(x)], position_ids[i, :len(x)] = x, s, q
    sq, sk = seg[:, :, None], seg[:, None, :]  # (B, T, 1) queries, (B, 1, T) keys
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (sk != 0) & ~((sq == 3) & (sk == 2))  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool)  # padding queries see themselves
    mask = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    out = {"input_ids": input_ids, "attention_mask": mask.to(dev), "position_ids": position_ids.to(dev),
           "score_src": torch.tensor([i * T + s for i, ss in enumerate(src) for s in ss], device=dev),
           "score_tgt": torch.cat(tgt).to(dev), "score_row": torch.tensor(sum(out_row, []), device=dev)}
    for k, v in batch.items():  # images and their sizes / grids / masks: the chosen rows' half, once per pair
        if k in ("input_ids", "attention_mask", "labels", "prompt_lens"):
            continue
        if not torch.is_tensor(v) or v.shape[:2] == ids.shape:
            raise ValueError(f"the fast path cannot re-lay the per-token input {k!r}; use the plain path")
        out[k] = v[: v.shape[0] // 2]  # subtle: rows [chosen; rejected] hold the same images, chosen first
    return out


def shared_prefix_forward(model, batch):
    """concatenated_forward for a build_shared_prefix_batch batch: the same four (B,) tensors, with
    the LM head applied only at the scored positions. `batch` may carry `mm_encoder_outputs`
    (image features computed once, see encode_images) instead of pixel_values."""
    import torch

    inputs = {k: v for k, v in batch.items() if not k.startswith("score_")}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch["score_src"]]  # (N, H)
    lp = vlm.logps_at(model, h, batch["score_tgt"])  # (N,)
    n_rows = 2 * hidden.shape[0]
    summed = torch.zeros(n_rows, dtype=lp.dtype, device=lp.device).index_add(0, batch["score_row"], lp)
    n_tokens = torch.bincount(batch["score_row"], minlength=n_rows)
    chosen_logps, rejected_logps = summed.float().chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_n, rejected_n


def encode_images(model, batch):
    """Run the (frozen) vision tower + projector once, no grad, and hand the features to every later
    forward of this batch (policy and reference) as `mm_encoder_outputs` instead of pixel_values.

    A plain batch holds each pair's images twice ([chosen; rejected] rows): only the first half is
    encoded and the features are reused for both. A prefix-shared batch already holds them once.
    Only valid while vision tower and projector are frozen: no gradient flows into them here.
    """
    import torch

    if "pixel_values" not in batch:
        return batch
    batch = dict(batch)
    plain = "score_src" not in batch
    takes = inspect.signature(model.model.get_image_features).parameters  # pixel_values, image_sizes, ...
    forward_reads = inspect.signature(model.model.forward).parameters
    image_inputs = {k: batch[k] for k in list(batch) if k in takes}
    for k in image_inputs:
        if k == "pixel_values" or k not in forward_reads:
            batch.pop(k)  # image sizes stay where the forward reads them too (LLaVA-NeXT's unpadding)
    if plain:
        image_inputs = {k: v[: v.shape[0] // 2] for k, v in image_inputs.items()}
    with torch.no_grad():
        feats = model.model.get_image_features(**image_inputs, return_dict=True)
    if plain:  # the same images again for the rejected rows
        po = feats.pooler_output
        feats.pooler_output = torch.cat([po, po]) if torch.is_tensor(po) else type(po)(list(po) * 2)
    batch["mm_encoder_outputs"] = {"image": feats}
    return batch


def pair_forward(model, batch):
    """concatenated_forward or shared_prefix_forward, whichever layout `batch` has."""
    return shared_prefix_forward(model, batch) if "score_src" in batch else concatenated_forward(model, batch)


def fast_path_blocker(model, batch):
    """Why the fast path cannot give the plain path's numbers for this model, or None.
    `batch`: a collate() batch (what the processor makes for this family)."""
    import torch

    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    if hasattr(model.model, "get_rope_index"):
        return "its M-RoPE positions come from the model's own rope index, which the fast path does not re-lay"
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return "its linear-attention layers read every earlier token, so rejected rows would see chosen ones"
    if "sliding_attention" in layer_types:
        return "its sliding-window layers need their own mask, which the fast path's single mask is not"
    per_token = [k for k, v in batch.items() if torch.is_tensor(v) and v.shape == batch["input_ids"].shape
                 and k not in ("input_ids", "attention_mask", "labels")]
    if per_token:
        return f"its per-token inputs {per_token} (e.g. bidirectional attention inside images) are not re-laid"
    return None


def self_check(run, batch_pairs, tol=None):
    """The fast path against section 2 on one micro-batch, no grad -> the largest difference of the
    summed log-probs; SystemExit when it is above tolerance (float32: 1e-4 relative + 1e-3)."""
    import torch

    plain = collate(batch_pairs, run.args.image_root, run.processor, run.device, run.model.dtype)
    was = run.model.training
    run.model.eval()
    with torch.no_grad():  # through the scorer: under FSDP only its forward gathers the sharded weights
        want = torch.cat(run.scorer(plain)[:2])
        got = torch.cat(run.scorer(make_batch(run, batch_pairs))[:2])
    run.model.train(was)
    rtol, atol = tol or ((1e-4, 1e-3) if run.model.dtype == torch.float32 else (2e-2, 0.5))
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise SystemExit(f"06_train_dpo: the fast path's log-probs differ from the plain path's by {diff:.3g} on the "
                         f"first batch (tolerance {rtol:g} relative + {atol:g}); this model needs "
                         f"--no-prefix-sharing --no-encode-images-once")
    return diff


def make_batch(run, batch_pairs):
    """Pairs -> the batch the step trains on: plain rows, or the fast path's layout."""
    batch = collate(batch_pairs, run.args.image_root, run.processor, run.device, run.model.dtype)
    if run.args.prefix_sharing:
        batch = build_shared_prefix_batch(batch, run.model.dtype)
    if run.encode_once:  # image features once per step, shared by policy and reference
        batch = encode_images(run.model, batch)
    return batch


# ==== 5. plumbing ================================================================================
# ---- pairs -------------------------------------------------------------------------------------
def load_pairs(path, image_root, processor, max_length, on_error):
    """Read and check every pair before the first step -> (pairs, Skips).

    A problem (missing field, marker/image count mismatch, unreadable image, bad stored log-prob)
    raises SystemExit listing all of them, or with on_error="skip" is counted; a pair longer than
    max_length tokens (images expanded) is always dropped and counted, never truncated.
    """
    skips, problems, pairs, seen = common.Skips(), [], [], set()
    img_tokens = {}
    rows = list(common.read_rows(path, on_error=on_error, skips=skips))
    with common.Progress(len(rows), "06 checking pairs", unit="pair", every=30 if len(rows) > 500 else math.inf) as bar:
        for line, row in rows:
            bar.update()
            try:
                images = common.check_pair_row(row, path, line)
                if row["id"] in seen:
                    raise common.DataError(path, line, "id", f"duplicate id {row['id']!r}")
                sizes = [common.load_image(image_root, rel).size for rel in images]
            except (common.DataError, common.ImageError) as e:
                if on_error != "skip":
                    problems.append(str(e))
                skips.add(row.get("id"), f"bad pair: {e}", path=path, line=line)
                continue
            n = max(_n_tokens(processor, row["prompt"], a, sizes, img_tokens) for a in (row["chosen"], row["rejected"]))
            if n > max_length:
                skips.add(row["id"], f"too long: {n} tokens > --max-length {max_length}", path=path, line=line)
                continue
            seen.add(row["id"])
            pairs.append(_pair(row, images))
    _refuse(problems, "pairs", path)
    return pairs, skips


def _n_tokens(processor, prompt, answer, sizes, img_tokens):
    """Tokens of prompt + answer + EOS with its images expanded; img_tokens caches each image size's count."""
    tok = processor.tokenizer
    for s in sizes:  # tokens an image adds when the processor expands it, measured once per size
        if s not in img_tokens:
            img_tokens[s] = _tokens_per_image(processor, s)
    text = vlm.render_pair(processor, prompt, answer)
    return len(tok(text[0] + text[1] + tok.eos_token)["input_ids"]) + sum(img_tokens[s] for s in sizes)


def _refuse(problems, what, path):
    """SystemExit listing the first 20 problems of `path`, if there are any."""
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SystemExit(f"06_train_dpo: {len(problems)} bad {what} in {path}:\n  {shown}\n"
                         f"(fix them, or pass --on-error skip to drop and count them)")


def _pair(row, images):
    mia = row.get("mia") if isinstance(row.get("mia"), dict) else {}
    stored = "ref_chosen_logps" in row
    return {"id": row["id"], "images": images, "prompt": row["prompt"], "chosen": row["chosen"],
            "rejected": row["rejected"], "format": str(mia.get("format", "unknown")),
            "n_images": int(mia.get("n_images", len(images))),
            "ref": (row["ref_chosen_logps"], row["ref_rejected_logps"]) if stored else None,
            "ref_fingerprint": row["ref_model"]["fingerprint"] if stored else None,
            "ref_images": row["ref_model"].get("image_settings") if stored else None}


def _tokens_per_image(processor, size):
    """Tokens an image of `size` adds to the text when the processor expands its placeholder."""
    from PIL import Image

    text = vlm.image_placeholder(processor)
    ids = processor(text=[text], images=[[Image.new("RGB", size)]], add_special_tokens=False)["input_ids"][0]
    return len(ids) - len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_replay(path, image_root, processor, max_length, on_error):
    """The replay rows (LLaVA JSON/JSONL, e.g. the base's own single-image tuning data) -> (rows
    [{id, images, prompt, answer}], Skips): each row's first human/gpt turn, as 01 and 04 take it.
    Bad rows are listed and stop the run, or with on_error="skip" are counted; rows longer than
    max_length tokens are dropped and counted."""
    skips, problems, rows, img_tokens = common.Skips(), [], [], {}
    for line, row in common.read_rows(path, on_error=on_error, skips=skips):
        try:
            images = common.check_llava_row(row, path, line)
            prompt, answer = row["conversations"][0]["value"], row["conversations"][1]["value"].strip()
            if prompt.count(common.MARKER) != len(images):
                raise common.DataError(path, line, "conversations[0].value",
                                       f"{prompt.count(common.MARKER)} <image> markers for {len(images)} images")
            if not answer:
                raise common.DataError(path, line, "conversations[1].value", "empty answer")
            sizes = [common.load_image(image_root, rel).size for rel in images]
        except (common.DataError, common.ImageError) as e:
            if on_error != "skip":
                problems.append(str(e))
            skips.add(row.get("id") if isinstance(row, dict) else None, f"bad replay row: {e}", path=path, line=line)
            continue
        n = _n_tokens(processor, prompt, answer, sizes, img_tokens)
        if n > max_length:
            skips.add(row["id"], f"too long: {n} tokens > --max-length {max_length}", path=path, line=line)
            continue
        rows.append({"id": row["id"], "images": images, "prompt": prompt, "answer": answer})
    _refuse(problems, "replay rows", path)
    return rows, skips


def replay_path(args):
    """--replay: a file, "none", or "auto" (the toy recipe) = the toy world's train.json in the
    folder of --pairs (00 writes both there) -> a Path or None."""
    from_recipe = getattr(args, "recipe_values", {})
    if args.replay in (None, "none"):
        if args.replay_weight and "replay_weight" not in from_recipe:
            raise SystemExit(f"06_train_dpo: --replay-weight {args.replay_weight} without replay rows: no replay term "
                             f"would be trained; give --replay FILE")
        return None
    if not args.replay_weight:
        if args.replay == "auto":
            return None
        raise SystemExit(f"06_train_dpo: --replay {args.replay} with --replay-weight {args.replay_weight}: no replay term "
                         f"would be trained; give a weight above 0, or --replay none")
    path = Path(args.pairs).parent / "train.json" if args.replay == "auto" else Path(args.replay)
    if not path.is_file():
        how = "--replay auto looks for the toy world's train.json beside --pairs" if args.replay == "auto" else ""
        raise SystemExit(f"06_train_dpo: replay rows {path}: no such file. {how}(pass --replay FILE, or --replay none)")
    return path


def replay_batch(rows, image_root, processor, device, dtype):
    """K replay rows -> one plain batch (prompt + answer + EOS, labels on answer + EOS), as collate."""
    images = [[common.load_image(image_root, rel) for rel in r["images"]] for r in rows]
    return on_device(vlm.build_inputs(processor, [r["prompt"] for r in rows], images,
                                         answers=[r["answer"] for r in rows]), device, dtype)


# ---- policy and reference ----------------------------------------------------------------------
def pick_reference(pairs, mode, fingerprint, lora, image_settings=None):
    """-> "stored" | "adapters-disabled" | "frozen-copy", or SystemExit saying why not: stored
    log-probs are used only when the same weights AND the same image settings computed them."""
    live = "adapters-disabled" if lora else "frozen-copy"
    stored = [p["ref"] is not None for p in pairs]
    if mode == "recompute" or (mode == "auto" and not any(stored)):
        return live
    if not all(stored):
        raise SystemExit(f"06_train_dpo: {stored.count(False)} of {len(pairs)} pairs lack ref_chosen_logps/"
                         f"ref_rejected_logps; pass --ref-logps recompute to compute them all with the model")
    other = {p["ref_fingerprint"] for p in pairs} - {fingerprint}
    if other:
        raise SystemExit(f"06_train_dpo: the pairs' reference log-probs come from model(s) {sorted(other)}, "
                         f"not the loaded model ({fingerprint}); they would be wrong here. Pass "
                         f"--ref-logps recompute to compute the reference with this model.")
    other = {p["ref_images"] for p in pairs if p["ref_images"]} - {image_settings}
    if image_settings and other:
        raise SystemExit(f"06_train_dpo: the pairs' reference log-probs were computed with other image settings "
                         f"({sorted(other)}, not {image_settings}: e.g. another --max-image-tokens); give 06 the "
                         f"--max-image-tokens 04 had, or pass --ref-logps recompute")
    return "stored"


def prepare_policy(model, args, reference):
    """-> (policy, frozen reference copy or None). LoRA on every language-model linear layer, or a
    full fine-tune; the vision tower and projector stay frozen unless --tune-vision/--tune-projector."""
    import torch

    if args.lora_r > 0 and (args.tune_vision or args.tune_projector) and reference == "adapters-disabled":
        raise SystemExit("06_train_dpo: with LoRA the reference is the model with its adapters disabled, which would "
                         "share the vision tower/projector being trained; use --lora-r 0 (a frozen copy) or stored log-probs")
    decoder, vision, projector = model_parts(model)
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lm = model.get_submodule(decoder)
        targets = [f"{decoder}.{n}" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets)
        policy, frozen = get_peft_model(model, cfg), None
    else:
        frozen = None if reference == "stored" else copy.deepcopy(model).eval().requires_grad_(False)
        policy = model
    for names, train in ((vision, args.tune_vision), (projector, args.tune_projector)):
        for name in names:
            model.get_submodule(name).requires_grad_(bool(train))
    return policy, frozen


VISION = ("vision_tower", "visual", "vision_model")  # what families call the vision encoder ...
PROJECTOR = ("multi_modal_projector", "connector", "embed_vision", "visual.merger", "visual.deepstack_merger_list")


def model_parts(model):
    """-> (decoder name, vision names, projector names) as `model.get_submodule` paths:
    llava: ("model.language_model", ["model.vision_tower"], ["model.multi_modal_projector"]);
    Qwen2.5-VL: (..., ["model.visual"], ["model.visual.merger"]); Idefics3: ("model.text_model", ...).
    A model with no known vision encoder is refused, naming its class."""
    names = dict(model.named_modules())
    decoder = next(n for n, m in names.items() if m is model.get_decoder())
    vision = [f"model.{n}" for n in VISION if f"model.{n}" in names]
    projector = [f"model.{n}" for n in PROJECTOR if f"model.{n}" in names]
    if not vision:
        raise SystemExit(f"06_train_dpo: {type(model).__name__}: no vision encoder under any of {VISION}")
    return decoder, vision, projector


def reference_logps(run, batch, batch_pairs):
    """Reference summed log-probs (B,), (B,) for chosen and rejected: stored, or one no-grad forward
    of the model with its adapters disabled, or of the frozen copy."""
    import torch

    if run.reference == "stored":
        ref = torch.tensor([p["ref"] for p in batch_pairs], dtype=torch.float64, device=run.device)  # (B, 2)
        return ref[:, 0], ref[:, 1]
    with torch.no_grad():
        if run.reference == "adapters-disabled":
            with run.policy.disable_adapter():
                ref_chosen, ref_rejected, _, _ = pair_forward(run.model, batch)
        else:
            ref_chosen, ref_rejected, _, _ = run.ref_scorer(batch)
    return ref_chosen, ref_rejected


def make_scorer(model):
    """A module whose forward is pair_forward (or, for replay rows, response_logps), so DDP's and
    FSDP's hooks wrap the whole computation."""
    import torch

    class PairScorer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch, replay=False):  # -> chosen logps, rejected logps, chosen n, rejected n, each (B,)
            if replay:  # plain rows with one answer each (replay_batch) -> summed log-probs, n tokens (K,)
                summed, _, n_tokens = vlm.response_logps(self.m, batch)
                return summed.float(), n_tokens
            return pair_forward(self.m, batch)

    return PairScorer(model)


# ---- schedule and data order -------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0 (transformers' get_linear_schedule_with_warmup).
    `step` = optimizer steps already taken. Example: warmup 2, total 10 -> 0, 0.5, 1, 0.875, ..."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def pair_order(n: int, seed: int, step: int, global_batch: int, rank: int, world: int, micro: int, accum: int):
    """Indices of the pairs that `rank` trains on at micro-step `micro` of 0-based `step`.

    Each epoch is a seeded permutation of the n pairs cut into global batches (last partial batch
    dropped); a global batch is cut into accum x world micro-batches, micro-major, so the same
    step sees the same pairs whatever the world size. Example: n 8, global 4, world 2, accum 1:
    step 0 -> rank 0 gets perm[0:2], rank 1 perm[2:4].
    """
    import torch

    per_epoch = n // global_batch
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    batch = perm[j * global_batch:(j + 1) * global_batch]
    b = global_batch // (world * accum)
    start = (micro * world + rank) * b
    return batch[start:start + b]


# ---- distributed -------------------------------------------------------------------------------
def setup_distributed(device: str):
    """-> (rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python does not."""
    import torch
    import torch.distributed as dist

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return rank, world, dev


def gather(obj, world):
    """All ranks' python objects, rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def shard(scorer):
    """FSDP2 (full fine-tuning of large models): each decoder layer is one unit, the rest (vision
    tower, projector, embeddings, head) the root; the scorer is the root so its forward gathers."""
    from torch.distributed.fsdp import fully_shard

    for layer in scorer.m.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(scorer)


# ---- the run: everything a step needs ----------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: object
    model: object  # carries the LoRA layers in place when peft wrapped it
    processor: object
    policy: object  # the peft model (LoRA) or the model itself
    scorer: object  # make_scorer(model), DDP- or FSDP-wrapped
    ref_scorer: object  # the frozen copy's scorer (full fine-tune without stored reference), else None
    reference: str
    fingerprint: str
    pairs: list
    skips: object
    trainable: list
    optimizer: object
    scheduler: object
    encode_once: bool
    global_batch: int
    per_epoch: int
    total: int
    out: Path
    replay: list = None  # load_replay rows, or None (no replay term)
    replay_skips: object = None
    replay_file: Path = None
    step: int = 0

    @property
    def master(self):
        return self.rank == 0


def build_run(args, rank, world, device):
    """Model, pairs, reference, policy, scorers, optimizer and schedule for `args` -> Run."""
    import torch

    model, processor = vlm.load_model(args.model, dtype=args.dtype, device=device,
                                         max_image_tokens=args.max_image_tokens)
    fingerprint = vlm.model_fingerprint(model)  # of the base model, before any adapter
    pairs, skips = load_pairs(args.pairs, args.image_root, processor, args.max_length, args.on_error)
    global_batch = args.batch_size * args.grad_accum * world
    if len(pairs) < global_batch:
        raise SystemExit(f"06_train_dpo: {len(pairs)} usable pairs, fewer than one global batch ({global_batch})")
    reference = pick_reference(pairs, args.ref_logps, fingerprint, args.lora_r > 0, vlm.image_settings_id(processor))
    policy, frozen = prepare_policy(model, args, reference)
    why = fast_path_blocker(model, collate(pairs[:1], args.image_root, processor, device, model.dtype))
    if why and (args.prefix_sharing or args.encode_images_once):
        if rank == 0:
            print(f"06_train_dpo: plain path (section 2), not the fast path, for {type(model).__name__}: {why}")
        args.prefix_sharing = args.encode_images_once = False  # kept so in the sidecar
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    scorer, ref_scorer = make_scorer(model), None if frozen is None else make_scorer(frozen)
    if args.fsdp:
        scorer, ref_scorer = shard(scorer), ref_scorer and shard(ref_scorer)
    elif world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(scorer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = len(pairs) // global_batch
    total = args.max_steps or args.epochs * per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    # features can be shared only while no gradient needs to reach the vision tower / projector
    encode_once = args.encode_images_once and not (args.tune_vision or args.tune_projector or args.fsdp)
    replay, replay_skips, replay_file = None, None, replay_path(args)
    if replay_file:
        replay, replay_skips = load_replay(replay_file, args.image_root, processor, args.max_length, args.on_error)
        args.replay_batch = args.replay_batch or args.batch_size
        if len(replay) < args.replay_batch * args.grad_accum * world:
            raise SystemExit(f"06_train_dpo: {len(replay)} usable replay rows in {replay_file}, fewer than one "
                             f"step's {args.replay_batch * args.grad_accum * world} (--replay-batch x accumulation x processes)")
    return Run(args, rank, world, device, model, processor, policy, scorer, ref_scorer, reference, fingerprint,
               pairs, skips, trainable, optimizer, scheduler, encode_once, global_batch, per_epoch, total, Path(args.out),
               replay, replay_skips, replay_file)


def forward_backward(run, compute, sync):
    """compute() -> (loss (B,), numbers), its mean / grad_accum back-propagated. Gradients are
    averaged across processes only when `sync` (the step's last backward), else they accumulate
    locally; DDP decides that in the forward, so compute runs inside the same context."""
    if run.args.fsdp:
        run.scorer.set_requires_gradient_sync(sync)
    no_sync = run.world > 1 and not run.args.fsdp and not sync
    with run.scorer.no_sync() if no_sync else contextlib.nullcontext():
        loss, numbers = compute()
        (loss.mean() / run.args.grad_accum).backward()
    return loss, numbers


def replay_step(run, micro):
    """The replay term on this micro-step's replay rows -> (loss (K,), mean token NLL (K,))."""
    a = run.args
    idx = pair_order(len(run.replay), a.seed + 1, run.step, a.replay_batch * a.grad_accum * run.world, run.rank,
                     run.world, micro, a.grad_accum)
    batch = replay_batch([run.replay[i] for i in idx], a.image_root, run.processor, run.device, run.model.dtype)
    logps, n_tokens = run.scorer(batch, replay=True)
    return replay_loss(logps, n_tokens, a.replay_weight), -logps.detach() / n_tokens.clamp(min=1)


def train_step(run):
    """One optimizer step over grad_accum micro-batches -> (the per-pair records of every rank,
    every rank's replay rows' mean token NLL: [] without replay)."""
    import torch

    args, recs, nlls = run.args, [], []
    for micro in range(args.grad_accum):
        idx = pair_order(len(run.pairs), args.seed, run.step, run.global_batch, run.rank, run.world, micro, args.grad_accum)
        batch_pairs = [run.pairs[i] for i in idx]
        batch = make_batch(run, batch_pairs)
        ref_chosen, ref_rejected = reference_logps(run, batch, batch_pairs)
        last = micro == args.grad_accum - 1  # the step's last backward averages gradients across processes
        _, numbers = forward_backward(run, lambda: dpo_step(run.scorer, batch, ref_chosen, ref_rejected, args),
                                      sync=last and not run.replay)
        recs += step_records(batch_pairs, numbers)
        if run.replay:  # its own forward and backward after the pairs'
            nlls += forward_backward(run, lambda: replay_step(run, micro), sync=last)[1].float().cpu().tolist()
    recs = [r for rs in gather(recs, run.world) for r in rs]
    nlls = [x for xs in gather(nlls, run.world) for x in xs]
    if all(math.isfinite(r["loss"]) for r in recs) and all(math.isfinite(x) for x in nlls):  # same on every rank
        torch.nn.utils.clip_grad_norm_(run.trainable, args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return recs, nlls


def train(run, log_path):
    """Steps until the total, one log line each -> "done", or why the run stopped."""
    run.policy.train()
    if run.args.prefix_sharing or run.encode_once:  # refuse to train on numbers the plain path would not give
        a = run.args
        first = pair_order(len(run.pairs), a.seed, run.step, run.global_batch, run.rank, run.world, 0, a.grad_accum)
        diff = self_check(run, [run.pairs[i] for i in first])
        if run.master:
            print(f"06_train_dpo: fast path checked against the plain path on the first batch: max |diff| {diff:.2e}")
    while run.step < run.total:
        t0, lr = time.time(), run.optimizer.param_groups[0]["lr"]
        recs, nlls = train_step(run)
        if not all(math.isfinite(r["loss"]) for r in recs) or not all(math.isfinite(x) for x in nlls):
            where = save_checkpoint(run)
            return f"non-finite loss at step {run.step + 1}; state before it saved to {where}"
        run.step += 1
        row = {"step": run.step, "epoch": (run.step - 1) // run.per_epoch + 1, "lr": lr, "ms": 1000 * (time.time() - t0),
               **summarise(recs), **({"replay_nll": sum(nlls) / len(nlls)} if nlls else {})}
        if run.master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(log_line(row, run.total), flush=True)
        if run.args.save_every and (run.step % run.args.save_every == 0 or run.step == run.total):
            save_checkpoint(run)
    return "done"


# ---- logs --------------------------------------------------------------------------------------
def step_records(pairs, numbers):
    """One small dict per pair (gathered across ranks for the log and its breakdown)."""
    cols = {k: t.detach().float().cpu().tolist() for k, t in numbers.items()}
    return [{"format": p["format"], "n_images": p["n_images"], **{k: v[i] for k, v in cols.items()}}
            for i, p in enumerate(pairs)]


def summarise(recs):
    def stats(rs):
        m = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        return {"n": len(rs), "loss": m("loss"), "acc": sum(r["reward_chosen"] > r["reward_rejected"] for r in rs) / len(rs),
                "margin": m("reward_chosen") - m("reward_rejected")}

    out = {**stats(recs), **{k: sum(r[k] for r in recs) / len(recs) for k in recs[0] if k not in ("format", "n_images", "loss")}}
    for key, name in (("format", "by_format"), ("n_images", "by_images")):
        groups = defaultdict(list)
        for r in recs:
            groups[str(r[key])].append(r)
        out[name] = {g: stats(rs) for g, rs in sorted(groups.items())}
    return out


def log_line(row, total):
    fmt = " ".join(f"{g} {s['acc']:.2f}/{s['n']}" for g, s in row["by_format"].items())
    imgs = " ".join(f"{g}:{s['acc']:.2f}/{s['n']}" for g, s in row["by_images"].items())
    return (f"step {row['step']}/{total} | loss {row['loss']:.4f} | acc {row['acc']:.2f} | margin {row['margin']:.3f} | "
            f"chosen {row['reward_chosen']:+.3f} | rejected {row['reward_rejected']:+.3f} | "
            + (f"replay nll {row['replay_nll']:.3f} | " if "replay_nll" in row else "") + f"lr {row['lr']:.1e} | "
            f"{row['ms']:.0f} ms | acc by format {fmt} | by images {imgs}")


def describe(run):
    a = run.args
    return (f"06_train_dpo: {len(run.pairs)} pairs ({len(run.skips)} skipped: {run.skips.summary()}) | {run.world} "
            f"process(es) x {a.batch_size} pairs x {a.grad_accum} accumulation = {run.global_batch} per step | "
            f"{run.total} steps ({run.per_epoch}/epoch) | {'LoRA r ' + str(a.lora_r) if a.lora_r else 'full fine-tune'}, "
            f"{sum(p.numel() for p in run.trainable) / 1e6:.2f}M trainable | reference: {run.reference} (model "
            f"{run.fingerprint}) | {'prefix-shared' if a.prefix_sharing else 'plain'} rows"
            f"{', images encoded once' if run.encode_once else ''}"
            + (f" | replay: {len(run.replay)} rows of {run.replay_file} ({len(run.replay_skips)} skipped), {a.replay_batch} "
               f"per micro-step, weight {a.replay_weight:g}" if run.replay else ""))


def plot_curves(log_path, png_path):
    """Loss, reward accuracy and margin per step -> PNG, drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    rows = [r for _, r in common.read_rows(log_path) if "step" in r]
    panels = [("loss", "loss"), ("acc", "reward accuracy"), ("margin", "reward margin")]
    w, h, pad = 420, 260, 40
    im = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(im)
    for i, (key, title) in enumerate(panels):
        x0, ys = i * w, [r[key] for r in rows]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-9
        d.rectangle((x0 + pad, pad, x0 + w - 10, h - pad), outline="black")
        d.text((x0 + pad, 12), f"{title}  ({ys[0]:.3g} -> {ys[-1]:.3g})", fill="black")
        d.text((x0 + 4, pad), f"{hi:.3g}", fill="gray")
        d.text((x0 + 4, h - pad - 10), f"{lo:.3g}", fill="gray")
        d.text((x0 + w - 60, h - pad + 6), f"step {rows[-1]['step']}", fill="gray")
        pts = [(x0 + pad + (w - pad - 10) * (j / max(1, len(ys) - 1)), h - pad - (h - 2 * pad) * (y - lo) / (hi - lo))
               for j, y in enumerate(ys)]
        d.line(pts, fill=(40, 90, 200), width=2) if len(pts) > 1 else d.point(pts, fill=(40, 90, 200))
    im.save(png_path)


# ---- checkpoints and the saved model -----------------------------------------------------------
def save_checkpoint(run):
    """OUT/checkpoints/step-NNNNNN/: trainable weights, optimizer, scheduler, every rank's RNG
    states and the step (the data position follows from it). Written to a temporary folder and
    renamed, so a crash mid-save leaves the previous checkpoint as the latest."""
    import numpy as np
    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    rngs = gather(rng, run.world)
    trainable, optim = full_state(run, run.optimizer)
    final = run.out / "checkpoints" / f"step-{run.step:06d}"
    if run.master:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"trainable": trainable, "optimizer": optim, "scheduler": run.scheduler.state_dict(),
                    "fsdp": run.args.fsdp, "rng": rngs, "step": run.step, "args": vars(run.args),
                    "reference": run.reference, "fingerprint": run.fingerprint}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = run.args.keep_checkpoints
        done = sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return final


def load_checkpoint(run, path):
    """Restore a save_checkpoint folder into `run` (weights, optimizer, schedule, RNG, step)."""
    import numpy as np
    import torch

    if not (Path(path) / "trainer_state.pt").is_file():
        raise SystemExit(f"06_train_dpo: --resume {path}: not a checkpoint folder (no trainer_state.pt)")
    ck = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    missing = set(ck["trainable"]) - {n for n, _ in run.policy.named_parameters()}
    if missing:
        raise SystemExit(f"06_train_dpo: checkpoint {path} holds weights this model lacks, e.g. {sorted(missing)[:3]} "
                         f"(resume with the same --model and LoRA settings)")
    if ck.get("fsdp", False) != run.args.fsdp:
        raise SystemExit(f"06_train_dpo: checkpoint {path} was written {'with' if ck.get('fsdp') else 'without'} --fsdp; resume the same way")
    if run.args.fsdp:  # every rank reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(run.scorer, {"m." + n: t for n, t in ck["trainable"].items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(run.scorer, run.optimizer, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            params = dict(run.policy.named_parameters())
            for n, t in ck["trainable"].items():
                params[n].copy_(t)
        run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    rng = ck["rng"][run.rank] if len(ck["rng"]) == run.world else ck["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.step = ck["step"]


def full_state(run, optimizer, only_trainable=True):
    """-> (trainable [or all] weights by name, optimizer state), whole tensors on rank 0 (None
    elsewhere). Under FSDP every rank must call it: the shards are gathered."""
    if not run.args.fsdp:
        if not run.master:
            return None, None
        return {n: p.detach().cpu() for n, p in run.policy.named_parameters() if p.requires_grad}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {"m." + n for n, p in run.policy.named_parameters() if p.requires_grad}  # scorer.m is the model
    weights = {k[2:]: v for k, v in get_model_state_dict(run.scorer, options=opts).items() if k in names or not only_trainable}
    return weights, optimizer and get_optimizer_state_dict(run.scorer, optimizer, options=opts)


def latest_checkpoint(out):
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_final(run):
    """LoRA: OUT/adapter (peft) and, with --merge, OUT/final (merged); full fine-tune: OUT/final
    (under FSDP the state dict gathered from every shard; every rank must call this)."""
    weights = full_state(run, None, only_trainable=False)[0] if run.args.fsdp else None
    if not run.master:
        return None
    saved, policy, out = [], run.policy, run.out
    if run.args.lora_r > 0:
        policy.save_pretrained(out / "adapter")
        run.processor.save_pretrained(out / "adapter")
        saved.append(str(out / "adapter"))
        if not run.args.merge:
            return saved
        policy = policy.merge_and_unload()
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
    run.processor.save_pretrained(tmp)
    shutil.rmtree(out / "final", ignore_errors=True)
    tmp.rename(out / "final")
    return saved + [str(out / "final")]


def start(args):
    """Seeds, threads, processes -> (rank, world, device); the recipe fills unset flags."""
    import numpy as np
    import torch

    rank, world, device = setup_distributed(args.device)
    toy = common.is_toy_model(args.model)
    common.apply_recipe(args, RECIPES, toy, "06_train_dpo", why=f"{'a' if toy else 'not a'} toy model", quiet=rank != 0)
    torch.manual_seed(args.seed)  # same on every rank: LoRA's random init agrees before DDP's broadcast
    random.seed(args.seed)
    np.random.seed(args.seed)
    common.set_threads(args.threads)
    if not Path(args.pairs).is_file():
        raise SystemExit(f"06_train_dpo: {args.pairs}: no such file. Make pairs first (python 04_gen_pairs.py, "
                         f"then python 05_post_select.py) or pass --pairs.")
    if args.fsdp and (args.lora_r > 0 or world == 1):
        raise SystemExit("06_train_dpo: --fsdp shards a full fine-tune (--lora-r 0) across torchrun processes")
    return rank, world, device


def main(args):
    t_start = time.time()
    run = build_run(args, *start(args))
    log_path = run.out / "log.jsonl"
    resume = latest_checkpoint(run.out) if args.resume == "auto" else args.resume
    if resume:
        load_checkpoint(run, resume)
    if run.master:
        run.out.mkdir(parents=True, exist_ok=True)
        old = [r for _, r in common.read_rows(log_path)] if resume and log_path.is_file() else []
        common.write_jsonl(log_path, [r for r in old if r.get("step", 0) <= run.step])  # drop steps after the checkpoint
        print(describe(run) + (f" | resumed at step {run.step} from {resume}" if resume else ""), flush=True)

    status = train(run, log_path)

    saved = save_final(run) if status == "done" else None
    if run.master:
        if args.plot and log_path.is_file() and log_path.stat().st_size:
            plot_curves(log_path, run.out / "curves.png")
        common.write_sidecar(log_path, args, counts={"pairs_read": len(run.pairs) + len(run.skips), "pairs_used": len(run.pairs),
                             "steps": run.step, "world_size": run.world, "replay_rows": len(run.replay or [])},
                             skips=run.skips, replay_skips=run.replay_skips and run.replay_skips.to_json(), reference=run.reference,
                             model_fingerprint=run.fingerprint, status=status, saved=saved)
        print(f"06_train_dpo: {status} in {time.time() - t_start:.0f} s, {run.step} steps -> {run.out}"
              + (f" ({', '.join(saved)})" if saved else ""))
    if run.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if status != "done":
        raise SystemExit(f"06_train_dpo: {status}")
    return run.out


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = "(default: from --recipe, see RECIPES)"
    g = p.add_argument_group("data")
    g.add_argument("--pairs", default="data/toy/pairs.post.jsonl", help="pairs JSONL from 05 (or 04)")
    g.add_argument("--image-root", default="data/toy/images")
    g.add_argument("--model", default="models/toy-llava", help="local HF model directory (policy and reference)")
    g.add_argument("--out", default="out/dpo-toy", help="output directory")
    g = p.add_argument_group("method")
    g.add_argument("--recipe", choices=("auto", "toy", "paper"), default="auto",
                   help="where unset flags come from: auto = toy for a model 00 built, paper for any other")
    g.add_argument("--loss", choices=("sigmoid", "ipo"), default="sigmoid", help="sigmoid = DPO (the paper), ipo = IPO")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--dpo-alpha", type=float, default=1.0, help="weight of the DPO term")
    g.add_argument("--gamma", type=float, help=f"weight of the SFT term on chosen; the paper: 0 {recipe}")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank; 0 = full fine-tune (reference: a frozen copy) {recipe}")
    g.add_argument("--lora-alpha", type=int, help=recipe)
    g.add_argument("--replay", help="single-image rows (LLaVA JSON/JSONL) for the replay term: a file, 'none', or 'auto' "
                   f"= train.json beside --pairs (the toy world's) {recipe}")
    g.add_argument("--replay-weight", type=float, help=f"weight of the replay term; the paper: 0 (none) {recipe}")
    g.add_argument("--replay-batch", type=int, default=None, help="replay rows per process per micro-step (default: --batch-size)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=recipe)
    g.add_argument("--epochs", type=int, help=recipe)
    g.add_argument("--batch-size", type=int, help=f"pairs per process per micro-step {recipe}")
    g.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step {recipe}")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs)")
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--dtype", choices=vlm.DTYPES, help=f"weights dtype (LoRA adapters stay float32) {recipe}")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, help=f"activation checkpointing {recipe}")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    common.add_max_image_tokens_flag(g)
    common.add_threads_flag(g)
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps (and at the end); 0: never {recipe}")
    g.add_argument("--resume", default=None, help="checkpoint folder, or 'auto' for OUT's latest")
    g.add_argument("--merge", action=argparse.BooleanOptionalAction, help=f"LoRA: also save the merged model to OUT/final {recipe}")
    g.add_argument("--plot", action="store_true", help="draw OUT/curves.png from the log")
    g = p.add_argument_group("advanced (defaults are right for almost every run)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss only)")
    g.add_argument("--ref-logps", choices=("auto", "stored", "recompute"), default="auto",
                   help="reference: stored in the pairs (only if their fingerprint matches), or computed by the model")
    g.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path: one [prompt | chosen | rejected] row per pair (same numbers as the plain path)")
    g.add_argument("--encode-images-once", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path: the frozen vision tower runs once per step (off with --tune-vision/--tune-projector/--fsdp)")
    g.add_argument("--tune-vision", action="store_true", help="train the vision tower too (full fine-tune)")
    g.add_argument("--tune-projector", action="store_true", help="train the projector too (full fine-tune)")
    g.add_argument("--fsdp", action="store_true", help="full fine-tune sharded across torchrun processes (FSDP2)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--max-length", type=int, default=4096, help="drop (and count) pairs longer than this, images expanded")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad pairs: list and stop, or count and drop")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last N checkpoints (0: all)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_stage(main, get_args)
