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
  (one GPU: python 06_train_dpo.py ... --batch-size 1 --grad-accum 64, the same 64 pairs per step)

Recipes: flags you do not set come from a recipe, printed at the start and kept in the sidecar.
`--recipe auto` (the default) takes `toy` for a model 00 built and `paper` for any other, so a
real checkpoint never gets the toy's full fine-tune at lr 2e-4. RECIPES (after the method) lists both.

Read this file top to bottom:
  method   the loss (dpo_loss: DPO / IPO / conservative DPO; mia_dpo_loss: + SFT term; replay_loss),
           the log-probs (concatenated_forward: chosen and rejected rows in ONE forward), the
           reference (pick_reference, reference_logps) and one micro-batch (dpo_step)
  data     pairs and replay rows, checked before the first step, in an order that is a function of
           (seed, step) alone: a resumed run, and N processes with the same global batch, see the
           same pairs at every step
  train    the loop: micro-steps, gradient accumulation, the replay term, optimizer step, log
  main     model, pairs, reference, policy, optimizer, resume, train, save; then the flags
The reference is, in this order of preference: the log-probs 04 stored with the pairs (only when
their fingerprint matches the loaded model), the model with its LoRA adapters disabled, or a
frozen copy (full fine-tuning). The fast path (prefix_sharing.py, on by default) gives the same
numbers ~2x faster: one [prompt | chosen | rejected] row per pair, images encoded once; 06 falls
back to plain rows where a model family needs it, and says why. The trained weights (LoRA or full,
DDP / FSDP, checkpoints, resume, the saved model): train_state.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import common
import prefix_sharing
import train_state
import vlm


# ---- method: the loss (edit me) ------------------------------------------------------------------
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


# ---- method: the log-probs, chosen and rejected in one forward -----------------------------------
def concatenated_forward(model, batch):
    """A collate() batch of 2B rows [chosen; rejected] -> (policy_chosen_logps, policy_rejected_logps,
    chosen_n_tokens, rejected_n_tokens), each (B,): summed log-probs of each answer + EOS given its
    prompt and images, and how many tokens were scored. One forward over all 2B rows."""
    summed, _, n_tokens = vlm.response_logps(model, batch)  # (2B,), LM head only at labelled positions
    chosen_logps, rejected_logps = summed.float().chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_n, rejected_n


def score(model, batch, replay=False):
    """One forward of the model, what the loop's scorer runs (train_state.make_scorers: inside a module
    DDP and FSDP can wrap): concatenated_forward's four (B,) tensors, or the same from the fast path's
    layout (prefix_sharing.shared_prefix_forward), or for plain replay rows (collate_replay) their
    summed log-probs and token counts, (K,) and (K,)."""
    if replay:
        summed, _, n_tokens = vlm.response_logps(model, batch)
        return summed.float(), n_tokens
    return prefix_sharing.shared_prefix_forward(model, batch) if "score_src" in batch else concatenated_forward(model, batch)


# ---- method: the reference -----------------------------------------------------------------------
def pick_reference(pairs, mode, fingerprint, lora, image_settings=None, dtype=None):
    """-> "stored" | "adapters-disabled" | "frozen-copy", or SystemExit saying why not: stored
    log-probs are used only when the same weights AND the same image settings computed them
    (`dtype`: the loaded weights', named when 04 loaded the model in another one)."""
    live = "adapters-disabled" if lora else "frozen-copy"
    stored = [p["ref"] is not None for p in pairs]
    if mode == "recompute" or (mode == "auto" and not any(stored)):
        return live
    if not all(stored):
        raise SystemExit(f"06_train_dpo: {stored.count(False)} of {len(pairs)} pairs lack ref_chosen_logps/"
                         f"ref_rejected_logps; pass --ref-logps recompute to compute them all with the model")
    if other := {p["ref_fingerprint"] for p in pairs} - {fingerprint}:
        dtypes = sorted({p["ref_dtype"] for p in pairs if p["ref_dtype"] and p["ref_dtype"] != dtype})
        hint = f"04 loaded the weights as {', '.join(dtypes)}, this run as {dtype}: --dtype {dtypes[0]}, or " if dtypes else ""
        raise SystemExit(f"06_train_dpo: the pairs' reference log-probs come from model(s) {sorted(other)}, "
                         f"not the loaded model ({fingerprint}); they would be wrong here. {hint}Pass "
                         f"--ref-logps recompute to compute the reference with this model.")
    if stale := [p["id"] for p in pairs if not p["ref_fresh"]]:
        raise SystemExit(f"06_train_dpo: {len(stale)} pairs (first: {stale[0]!r}) render to other tokens than 04 scored "
                         f"(chat template or tokenizer changed; a template may write the date); pass --ref-logps recompute")
    other = {p["ref_images"] for p in pairs if p["ref_images"]} - {image_settings}
    if image_settings and other:
        raise SystemExit(f"06_train_dpo: the pairs' reference log-probs were computed with other image settings "
                         f"({sorted(other)}, not {image_settings}: e.g. another --max-image-tokens); give 06 the "
                         f"--max-image-tokens 04 had, or pass --ref-logps recompute")
    return "stored"


def reference_logps(reference, batch, batch_pairs, policy=None, ref_scorer=None):
    """Reference summed log-probs (B,), (B,) for chosen and rejected: the ones stored with the pairs,
    or one no-grad forward of the policy with its LoRA adapters disabled, or of the frozen copy."""
    import torch

    if reference == "stored":
        ref = torch.tensor([p["ref"] for p in batch_pairs], dtype=torch.float64, device=batch["input_ids"].device)  # (B, 2)
        return ref[:, 0], ref[:, 1]
    with torch.no_grad():
        if reference == "adapters-disabled":
            with policy.disable_adapter():
                ref_chosen, ref_rejected, _, _ = score(policy.get_base_model(), batch)
        else:
            ref_chosen, ref_rejected, _, _ = ref_scorer(batch)
    return ref_chosen, ref_rejected


# ---- method: one micro-batch ---------------------------------------------------------------------
def dpo_step(scorer, batch, ref_chosen_logps, ref_rejected_logps, *, beta, loss_type="sigmoid", label_smoothing=0.0,
             dpo_alpha=1.0, gamma=0.0):
    """Policy log-probs (scorer: score, wrapped), the loss -> (loss (B,) to back-propagate,
    the numbers the log shows per pair)."""
    policy_chosen_logps, policy_rejected_logps, chosen_n, rejected_n = scorer(batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps.float(), ref_rejected_logps.float(),
        beta, loss_type, label_smoothing, chosen_n, rejected_n)
    loss = mia_dpo_loss(losses, policy_chosen_logps, chosen_n, dpo_alpha, gamma)
    numbers = {"loss": loss, "reward_chosen": chosen_rewards, "reward_rejected": rejected_rewards,
               "logps_chosen": policy_chosen_logps, "logps_rejected": policy_rejected_logps,
               "ref_logps_chosen": ref_chosen_logps, "ref_logps_rejected": ref_rejected_logps}
    return loss, numbers


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


# ---- data ----------------------------------------------------------------------------------------
def collate(pairs, image_root, processor, model):
    """B pairs -> one batch of 2B rows on the model's device, chosen rows first, then rejected: each
    row is the prompt (the model's chat template, images in place) + the answer + EOS, labels on
    answer + EOS only (vlm.build_inputs, the same function 04 and 07 build prompts with)."""
    images = [[common.load_image(image_root, rel) for rel in p["images"]] for p in pairs]
    answers = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return vlm.to_model(vlm.build_inputs(processor, [p["prompt"] for p in pairs] * 2, images * 2, answers=answers), model)


def collate_replay(rows, image_root, processor, model):
    """K replay rows -> one plain batch of K rows (prompt + answer + EOS, labels on answer + EOS), as collate."""
    images = [[common.load_image(image_root, rel) for rel in r["images"]] for r in rows]
    return vlm.to_model(vlm.build_inputs(processor, [r["prompt"] for r in rows], images,
                                         answers=[r["answer"] for r in rows]), model)


def load_pairs(path, image_root, processor, max_length, on_error):
    """Read and check every pair before the first step -> (pairs, Skips).

    A problem (missing field, marker/image count mismatch, unreadable image, bad stored log-prob,
    duplicate id) raises SystemExit listing all of them, or with on_error="skip" is counted; a pair
    longer than max_length tokens (images expanded) is always dropped and counted, never truncated.
    """
    def parse(row, line):
        images = common.check_pair_row(row, path, line)
        mia = row.get("mia") if isinstance(row.get("mia"), dict) else {}
        stored, answers = "ref_chosen_logps" in row, (row["chosen"], row["rejected"])
        pair = {"id": row["id"], "images": images, "prompt": row["prompt"], "chosen": row["chosen"],
                "rejected": row["rejected"], "format": str(mia.get("format", "unknown")),
                "n_images": int(mia.get("n_images", len(images))),
                "ref": (row["ref_chosen_logps"], row["ref_rejected_logps"]) if stored else None,
                "ref_fingerprint": row["ref_model"]["fingerprint"] if stored else None,
                "ref_images": row["ref_model"].get("image_settings") if stored else None,
                "ref_dtype": row["ref_model"].get("dtype") if stored else None,  # and did 04 score these very tokens?
                "ref_fresh": row.get("ref_text") in (None, vlm.text_fingerprint(processor, row["prompt"], answers))}
        return pair, answers

    return _checked_rows(path, image_root, processor, max_length, on_error, "pair", parse, unique_ids=True,
                         progress="06 checking pairs")


def load_replay(path, image_root, processor, max_length, on_error, need=0):
    """The replay rows (LLaVA JSON/JSONL, e.g. the base's own single-image tuning data) -> (rows
    [{id, images, prompt, answer}], Skips): each row's first human/gpt turn, as 01 and 04 take it.
    Bad rows are listed and stop the run, or with on_error="skip" are counted; rows longer than
    max_length tokens are dropped and counted. Fewer than `need` usable rows (one step's) stop it."""
    def parse(row, line):
        images = common.check_llava_row(row, path, line)
        prompt, answer = row["conversations"][0]["value"], row["conversations"][1]["value"].strip()
        if prompt.count(common.MARKER) != len(images):
            raise common.DataError(path, line, "conversations[0].value",
                                   f"{prompt.count(common.MARKER)} <image> markers for {len(images)} images")
        if not answer:
            raise common.DataError(path, line, "conversations[1].value", "empty answer")
        return {"id": row["id"], "images": images, "prompt": prompt, "answer": answer}, (answer,)

    rows, skips = _checked_rows(path, image_root, processor, max_length, on_error, "replay row", parse)
    if len(rows) < need:
        raise SystemExit(f"06_train_dpo: {len(rows)} usable replay rows in {path}, fewer than one step's "
                         f"{need} (--replay-batch x accumulation x processes)")
    return rows, skips


def _checked_rows(path, image_root, processor, max_length, on_error, what, parse, unique_ids=False, progress=None):
    """What load_pairs and load_replay share: every row of `path` through parse(row, line) -> (item,
    answers) (DataError for a bad row), its images opened, its longest prompt + answer + EOS measured
    in tokens -> (items, Skips). Bad rows are collected and stop the run at the end, listed, or are
    counted with on_error="skip"; rows over max_length tokens are dropped and counted."""
    skips, problems, items, seen, img_tokens = common.Skips(), [], [], set(), {}
    rows = list(common.read_rows(path, on_error=on_error, skips=skips))
    every = 30 if progress and len(rows) > 500 else math.inf
    with common.Progress(len(rows), progress, unit=what, every=every) if progress else contextlib.nullcontext() as bar:
        for line, row in rows:
            if bar:
                bar.update()
            try:
                item, answers = parse(row, line)
                if unique_ids and row["id"] in seen:
                    raise common.DataError(path, line, "id", f"duplicate id {row['id']!r}")
                sizes = [common.load_image(image_root, rel).size for rel in item["images"]]
            except (common.DataError, common.ImageError) as e:
                if on_error != "skip":
                    problems.append(str(e))
                skips.add(row.get("id"), f"bad {what}: {e}", path=path, line=line)
                continue
            n = max(_n_tokens(processor, item["prompt"], a, sizes, img_tokens) for a in answers)
            if n > max_length:
                skips.add(row["id"], f"too long: {n} tokens > --max-length {max_length}", path=path, line=line)
                continue
            seen.add(row["id"])
            items.append(item)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SystemExit(f"06_train_dpo: {len(problems)} bad {what}s in {path}:\n  {shown}\n"
                         f"(fix them, or pass --on-error skip to drop and count them)")
    return items, skips


def _n_tokens(processor, prompt, answer, sizes, img_tokens):
    """Tokens of prompt + answer + EOS with its images expanded; img_tokens caches each image size's count."""
    from PIL import Image

    tok = processor.tokenizer
    for s in sizes:  # tokens an image adds when the processor expands its placeholder, measured once per size
        if s not in img_tokens:
            text = vlm.image_placeholder(processor)
            ids = processor(text=[text], images=[[Image.new("RGB", s)]], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            img_tokens[s] = len(ids) - len(tok(text, add_special_tokens=False)["input_ids"])
    text = vlm.render_pair(processor, prompt, answer)
    return len(tok(text[0] + text[1] + tok.eos_token)["input_ids"]) + sum(img_tokens[s] for s in sizes)


def replay_path(replay, weight, pairs_path, weight_from_recipe=False):
    """--replay: a file, "none", or "auto" (the toy recipe) = the toy world's train.json in the
    folder of --pairs (00 writes both there) -> a Path or None. A weight without rows, or rows
    without a weight, would train no replay term: refused, unless the weight is the recipe's."""
    if replay in (None, "none"):
        if weight and not weight_from_recipe:
            raise SystemExit(f"06_train_dpo: --replay-weight {weight} without replay rows: no replay term "
                             f"would be trained; give --replay FILE")
        return None
    if not weight:
        if replay == "auto":
            return None
        raise SystemExit(f"06_train_dpo: --replay {replay} with --replay-weight {weight}: no replay term "
                         f"would be trained; give a weight above 0, or --replay none")
    path = Path(pairs_path).parent / "train.json" if replay == "auto" else Path(replay)
    if not path.is_file():
        how = "--replay auto looks for the toy world's train.json beside --pairs" if replay == "auto" else ""
        raise SystemExit(f"06_train_dpo: replay rows {path}: no such file. {how}(pass --replay FILE, or --replay none)")
    return path


def pair_order(n: int, seed: int, step: int, global_batch: int, rank: int, world: int, micro: int, accum: int):
    """Indices of the rows that `rank` trains on at micro-step `micro` of 0-based `step`.

    Each epoch is a seeded permutation of the n rows cut into global batches (last partial batch
    dropped); a global batch is cut into accum x world micro-batches, micro-major, so the same
    step sees the same rows whatever the world size. Example: n 8, global 4, world 2, accum 1:
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then linear decay to 0 (transformers' get_linear_schedule_with_warmup).
    `step` = optimizer steps already taken. Example: warmup 2, total 10 -> 0, 0.5, 1, 0.875, ..."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# ---- training: one loop --------------------------------------------------------------------------
def train(state, model, pairs, replay, *, reference, ref_scorer, image_root, processor, share_prefix, encode_once,
          step, total, seed, global_batch, grad_accum, replay_batch, objective, replay_weight, max_grad_norm,
          rank, world, log_path, save_every, save):
    """Optimizer steps from `step` to `total`, one log line each -> ("done" or why the run stopped, step).

    state        train_state.TrainState: policy, scorer (`score`, wrapped for the processes), optimizer, scheduler
    reference    pick_reference's answer (+ ref_scorer, the frozen copy's scorer, for "frozen-copy")
    share_prefix, encode_once   the fast path's two halves (prefix_sharing.py), as main decided them
    objective    dpo_step's loss settings (beta, loss_type, label_smoothing, dpo_alpha, gamma)
    replay       load_replay rows or None; replay_batch rows per process per micro-step, replay_weight
    global_batch pairs per optimizer step over all `world` processes and `grad_accum` micro-steps
    save(step)   writes a checkpoint (train_state.save_checkpoint) -> its folder
    """
    import torch

    policy, scorer, optimizer, scheduler = state.policy, state.scorer, state.optimizer, state.scheduler
    params = [p for g in optimizer.param_groups for p in g["params"]]
    policy.train()
    if share_prefix or encode_once:  # refuse to train on numbers the plain path would not give
        first = [pairs[i] for i in pair_order(len(pairs), seed, step, global_batch, rank, world, 0, grad_accum)]
        diff = prefix_sharing.self_check(scorer, model, collate(first, image_root, processor, model), share_prefix, encode_once)
        if rank == 0:
            print(f"06_train_dpo: fast path checked against the plain path on the first batch: max |diff| {diff:.2e}")
    while step < total:
        t0, lr = time.time(), optimizer.param_groups[0]["lr"]
        recs, nlls = [], []  # per pair: the log's numbers; per replay row: its mean token NLL
        for micro in range(grad_accum):
            last = micro == grad_accum - 1  # the step's last backward averages gradients across processes
            idx = pair_order(len(pairs), seed, step, global_batch, rank, world, micro, grad_accum)
            batch_pairs = [pairs[i] for i in idx]
            batch = collate(batch_pairs, image_root, processor, model)  # 2B rows [chosen; rejected]
            batch = prefix_sharing.lay_out(model, batch, share_prefix, encode_once)  # or B [prompt | chosen | rejected] rows
            ref_chosen, ref_rejected = reference_logps(reference, batch, batch_pairs, policy, ref_scorer)  # (B,), (B,)
            with grad_sync(scorer, last and not replay, state.fsdp, world):
                loss, numbers = dpo_step(scorer, batch, ref_chosen, ref_rejected, **objective)  # (B,)
                (loss.mean() / grad_accum).backward()
            recs += step_records(batch_pairs, numbers)
            if replay:  # the replay term: its own forward and backward after the pairs'
                idx = pair_order(len(replay), seed + 1, step, replay_batch * grad_accum * world, rank, world, micro, grad_accum)
                with grad_sync(scorer, last, state.fsdp, world):
                    logps, n_tokens = scorer(collate_replay([replay[i] for i in idx], image_root, processor, model), replay=True)
                    (replay_loss(logps, n_tokens, replay_weight).mean() / grad_accum).backward()  # (K,) -> mean
                nlls += (-logps.detach() / n_tokens.clamp(min=1)).float().cpu().tolist()
        recs = [r for rs in train_state.gather(recs, world) for r in rs]  # every process's pairs
        nlls = [x for xs in train_state.gather(nlls, world) for x in xs]
        finite = all(math.isfinite(r["loss"]) for r in recs) and all(math.isfinite(x) for x in nlls)  # same on every rank
        if finite:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            return f"non-finite loss at step {step + 1}; state before it saved to {save(step)}", step
        step += 1
        row = {"step": step, "epoch": (step - 1) // (len(pairs) // global_batch) + 1, "lr": lr,
               "ms": 1000 * (time.time() - t0), **summarise(recs), **({"replay_nll": sum(nlls) / len(nlls)} if nlls else {})}
        if rank == 0:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(log_line(row, total), flush=True)
        if save_every and (step % save_every == 0 or step == total):
            save(step)
    return "done", step


def grad_sync(scorer, sync, fsdp, world):
    """Context for a forward + backward whose gradients are averaged across processes only when
    `sync` (the step's last backward), else accumulated locally. DDP decides it in the forward,
    so the forward runs inside the context; FSDP is told before."""
    if fsdp:
        scorer.set_requires_gradient_sync(sync)
    return scorer.no_sync() if world > 1 and not fsdp and not sync else contextlib.nullcontext()


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


# ---- plumbing ------------------------------------------------------------------------------------
def preflight(pairs, global_batch, pick):
    """Everything that stops a run before its first step, said in ONE message with every flag to
    change (a small run on one CPU with the paper recipe meets two at once) -> pick()'s reference."""
    problems = [] if len(pairs) >= global_batch else [
        f"{len(pairs)} usable pairs, fewer than one global batch ({global_batch} = --batch-size x --grad-accum x "
        f"processes): give --grad-accum (or --batch-size) so that it is at most {len(pairs)}"]
    try:
        reference = pick()
    except SystemExit as e:
        problems.append(str(e).removeprefix("06_train_dpo: "))
    if problems:
        raise SystemExit("06_train_dpo: cannot start:\n  - " + "\n  - ".join(problems))
    return reference


def configure_optimizer(policy, lr, weight_decay, warmup, total):
    """AdamW over the policy's trainable weights and its schedule: linear warm-up over `warmup` steps,
    then linear decay to 0 at `total` (lr_factor) -> (optimizer, scheduler)."""
    import torch

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


def start(args):
    """Processes, seeds, threads -> (rank, world, device)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    device, rank, world = vlm.pick_device(args.device), 0, 1
    if int(os.environ.get("RANK", -1)) != -1:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain python does not
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        device = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # same on every rank: LoRA's random init agrees before DDP's broadcast
    random.seed(args.seed)
    np.random.seed(args.seed)
    common.set_threads(args.threads)
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    if not Path(args.pairs).is_file():
        raise SystemExit(f"06_train_dpo: {args.pairs}: no such file. Make pairs first (python 04_gen_pairs.py, "
                         f"then python 05_post_select.py) or pass --pairs.")
    if args.fsdp and (args.lora_r > 0 or world == 1):
        raise SystemExit("06_train_dpo: --fsdp shards a full fine-tune (--lora-r 0) across torchrun processes")
    return rank, world, torch.device(device)


def main(args):
    t_start = time.time()
    rank, world, device = start(args)
    master, out, log_path = rank == 0, Path(args.out), Path(args.out) / "log.jsonl"
    train_state.claim(out, args.resume, args.overwrite, rank, world)  # OUT: this run's, held by this process
    model, processor = vlm.load_model(args.model, dtype=args.dtype, device=device, max_image_tokens=args.max_image_tokens)
    fingerprint = vlm.model_fingerprint(model)  # of the base model, before any adapter
    pairs, skips = load_pairs(args.pairs, args.image_root, processor, args.max_length, args.on_error)
    global_batch = args.batch_size * args.grad_accum * world  # pairs per optimizer step
    reference = preflight(pairs, global_batch, lambda: pick_reference(
        pairs, args.ref_logps, fingerprint, args.lora_r > 0, vlm.image_settings_id(processor), vlm.dtype_name(model)))
    policy, frozen = train_state.prepare_policy(model, reference, args.lora_r, args.lora_alpha, args.lora_dropout,
                                                args.tune_vision, args.tune_projector, args.grad_ckpt)
    share_prefix, encode_images = prefix_sharing.choose_path(model, collate(pairs[:1], args.image_root, processor, model),
                                                             args.prefix_sharing, args.encode_images_once, master)
    flags = argparse.Namespace(**{**vars(args), "prefix_sharing": share_prefix, "encode_images_once": encode_images})  # as run
    # image features can be shared only while no gradient needs to reach the vision tower / projector
    encode_once = encode_images and not (args.tune_vision or args.tune_projector or args.fsdp)
    scorer, ref_scorer = train_state.make_scorers(model, frozen, score, args.fsdp, world)
    total = args.max_steps or args.epochs * (len(pairs) // global_batch)
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    optimizer, scheduler = configure_optimizer(policy, args.lr, args.weight_decay, warmup, total)
    replay_file = replay_path(args.replay, args.replay_weight, args.pairs, "replay_weight" in args.recipe_values)
    replay, replay_skips = load_replay(replay_file, args.image_root, processor, args.max_length, args.on_error,
                                       need=args.replay_batch * args.grad_accum * world) if replay_file else (None, None)
    state = train_state.TrainState(policy, scorer, optimizer, scheduler, args.fsdp)
    run = dict(zip(("run_id", "settings"), train_state.run_settings(flags, args.pairs, fingerprint)))
    step, resumed = train_state.resume(state, args.resume, out, rank, world, run)  # same settings only
    if master:
        print(train_state.describe(flags, world, pairs, skips, total, optimizer, reference, fingerprint, encode_once, replay,
                                   replay_file, replay_skips) + (f" | resumed at step {step} from {resumed}" if resumed else ""))
    meta = {"args": vars(flags), "reference": reference, "fingerprint": fingerprint}  # what each checkpoint records

    status, step = train(
        state, model, pairs, replay, reference=reference, ref_scorer=ref_scorer, image_root=args.image_root,
        processor=processor, share_prefix=share_prefix, encode_once=encode_once, step=step, total=total, seed=args.seed,
        global_batch=global_batch, grad_accum=args.grad_accum, replay_batch=args.replay_batch,
        objective=dict(beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing,
                       dpo_alpha=args.dpo_alpha, gamma=args.gamma), replay_weight=args.replay_weight,
        max_grad_norm=args.max_grad_norm, rank=rank, world=world, log_path=log_path, save_every=args.save_every,
        save=lambda s: train_state.save_checkpoint(state, out, s, rank, world, args.keep_checkpoints, meta, run))

    saved = train_state.save_final(state, processor, out, master, args.lora_r > 0, args.merge) if status == "done" else None
    if master:
        if args.plot and log_path.is_file() and log_path.stat().st_size:
            train_state.plot_curves(log_path, out / "curves.png")
        common.write_sidecar(log_path, flags, counts={"pairs_read": len(pairs) + len(skips), "pairs_used": len(pairs),
                             "steps": step, "world_size": world, "replay_rows": len(replay or [])}, skips=skips,
                             replay_skips=None if replay_skips is None else replay_skips.to_json(),
                             reference=reference, model_fingerprint=fingerprint, status=status, saved=saved)
        print(f"06_train_dpo: {status} in {time.time() - t_start:.0f} s, {step} steps -> {out}"
              + (f" ({', '.join(saved)})" if saved else ""))
    train_state.end_processes(world)
    if status != "done":
        raise SystemExit(f"06_train_dpo: {status}")
    return out


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
    common.add_image_flags(g)
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps (and at the end); 0: never {recipe}")
    g.add_argument("--resume", default=None, help="checkpoint folder, or 'auto' for OUT's latest (of the same settings)")
    g.add_argument("--overwrite", action="store_true", help="OUT holds an earlier run: remove it and start over")
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
    args = p.parse_args(argv)
    toy = common.is_toy_model(args.model)
    args = common.apply_recipe(args, RECIPES, toy, "06_train_dpo", why=f"{'a' if toy else 'not a'} toy model",
                               quiet=int(os.environ.get("RANK", 0)) != 0)  # torchrun: rank 0 prints it
    replay_on = args.replay not in (None, "none") and args.replay_weight  # main's replay_path checks the rest
    replay_batch = (args.replay_batch or args.batch_size) if replay_on else args.replay_batch
    return argparse.Namespace(**{**vars(args), "replay_batch": replay_batch})


if __name__ == "__main__":
    common.run_stage(main, get_args)
