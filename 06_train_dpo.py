"""
06_train_dpo.py — stage 6: preference pairs -> a DPO-aligned vision-language model.
in : pairs JSONL (04/05) + image root + local model dir
out: OUT/log.jsonl (+ .meta.json), OUT/checkpoints/step-NNNNNN/, OUT/adapter/ (LoRA), OUT/final/ (merged or full)
  python 06_train_dpo.py                                  # toy default: data/toy/pairs.post.jsonl (05) on models/toy-llava
  python 06_train_dpo.py --max-steps 40 --plot            # ... and draw OUT/curves.png
  torchrun --nproc_per_node 2 06_train_dpo.py             # DDP: gloo on CPU, nccl on GPU, same losses
  torchrun --nproc_per_node 8 06_train_dpo.py --lora-r 0 --fsdp ...   # full fine-tune, FSDP2-sharded
  python 06_train_dpo.py --resume auto                    # continue from OUT's latest checkpoint

The paper's LLaVA-1.5 recipe (8 GPUs x 1 pair x 8 accumulation = 64 pairs per step, 3 epochs):
  torchrun --nproc_per_node 8 06_train_dpo.py --model llava-1.5-7b-hf --pairs pairs.jsonl \\
      --image-root /data --out out/mia-dpo-llava15 --dtype bfloat16 --grad-ckpt \\
      --lora-r 128 --lora-alpha 256 --beta 0.1 --gamma 0 --lr 5e-5 --warmup-ratio 0.1 \\
      --batch-size 1 --grad-accum 8 --epochs 3 --merge

Loss = dpo_alpha * DPO + gamma * SFT(chosen) on summed response log-probs (incl. EOS); chosen
and rejected of a batch go through the model in ONE forward. Fast path (issue 6, same log-probs
and gradients, tests/test_train_dpo_fast.py): --prefix-sharing puts each pair in one row
[prompt | chosen | rejected] under a block attention mask, so the prompt and its images run once
per pair; --encode-images-once runs the frozen vision tower once per step for policy and reference.
Both are on by default (~2x the plain path's pairs/s at half its memory, BENCHMARKS.md); pass
--no-prefix-sharing --no-encode-images-once for the plain path. The reference is, in this order of
preference, the log-probs 04 stored in the pairs (only when their fingerprint matches the loaded
model), the model with its LoRA adapters disabled, or a frozen copy (full fine-tuning); the run
log and sidecar say which. Data order is a function of (seed, step) alone: a resumed run, and a
run on N processes with the same global batch, see the same pairs at every step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import common

# ---- method: what the paper specifies (edit me) -------------------------------------------------


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO loss and implicit rewards.

    All inputs: (B,) summed log-probs of the chosen / rejected response under policy / reference.
    returns   : (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * log-ratio.
      h = (pc - rc) - (pr - rr)                                   (log-ratio difference)
      sigmoid (DPO, Rafailov et al. 2023, eq. 7):  -(1-e) log sig(beta h) - e log sig(-beta h)
               e = label_smoothing: conservative DPO, the chosen label is wrong with probability e
      ipo     (Azar et al. 2023, eq. 17):          (h - 1 / (2 beta))^2
               (IPO's authors and TRL feed it length-averaged log-probs; the trainer does so too)
    Worked example: policy == reference -> h = 0 -> loss log 2 = 0.6931, rewards 0. With
    pc, pr, rc, rr = -1, -3, -2, -2 and beta 0.1: rewards 0.1 and -0.1, h = 2,
    loss = -log sig(0.2) = 0.5981.
    """
    import torch.nn.functional as F

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


# ---- plumbing -----------------------------------------------------------------------------------
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


def load_pairs(path, image_root, processor, max_length, on_error):
    """Read and check every pair before the first step -> (pairs, Skips).

    A problem (missing field, marker/image count mismatch, unreadable image, bad stored log-prob)
    raises SystemExit listing all of them, or with on_error="skip" is counted; a pair longer than
    max_length tokens (images expanded) is always dropped and counted, never truncated.
    """
    from tqdm import tqdm

    skips, problems, pairs, seen = common.Skips(), [], [], set()
    tok, img_tokens = processor.tokenizer, {}
    rows = list(common.read_rows(path, on_error=on_error, skips=skips))
    for line, row in tqdm(rows, desc="checking pairs", leave=False, disable=len(rows) < 500):
        try:
            p = _check_pair(row, path, line, seen)
            sizes = [common.load_image(image_root, rel).size for rel in p["images"]]
        except (common.DataError, common.ImageError) as e:
            if on_error != "skip":
                problems.append(str(e))
            skips.add(row.get("id"), f"bad pair: {e}", path=path, line=line)
            continue
        for s in sizes:  # visual tokens per image, measured once per image size
            if s not in img_tokens:
                img_tokens[s] = _tokens_per_image(processor, s)
        text = max((common.render_pair(processor, p["prompt"], a) for a in (p["chosen"], p["rejected"])),
                   key=lambda pr: len(tok(pr[0] + pr[1])["input_ids"]))
        n = len(tok(text[0] + text[1] + tok.eos_token)["input_ids"]) + sum(img_tokens[s] - 1 for s in sizes)
        if n > max_length:
            skips.add(p["id"], f"too long: {n} tokens > --max-length {max_length}", path=path, line=line)
            continue
        seen.add(p["id"])
        pairs.append(p)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SystemExit(f"06_train_dpo: {len(problems)} bad pairs in {path}:\n  {shown}\n"
                         f"(fix them, or pass --on-error skip to drop and count them)")
    return pairs, skips


def _check_pair(row, path, line, seen):
    def bad(field, msg):
        raise common.DataError(path, line, field, msg)

    if not isinstance(row.get("id"), (str, int)) or row.get("id") == "":
        bad("id", "missing or not a string/integer")
    if row["id"] in seen:
        bad("id", f"duplicate id {row['id']!r}")
    imgs = [row["image"]] if isinstance(row.get("image"), str) else row.get("image")
    if not isinstance(imgs, list) or not imgs or not all(isinstance(x, str) and x for x in imgs):
        bad("image", "missing, or not a path / list of paths")
    for f in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(f), str) or not row[f].strip():
            bad(f, "missing, empty or not a string")
    if row["prompt"].count("<image>") != len(imgs):
        bad("prompt", f"{row['prompt'].count('<image>')} <image> markers for {len(imgs)} images")
    if row["chosen"].strip() == row["rejected"].strip():
        bad("rejected", "equals chosen")
    ref = None
    if "ref_chosen_logps" in row or "ref_rejected_logps" in row:
        ref = (row.get("ref_chosen_logps"), row.get("ref_rejected_logps"))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ref):
            bad("ref_chosen_logps", "ref_chosen_logps / ref_rejected_logps must both be finite numbers")
        if not isinstance(row.get("ref_model"), dict) or not row["ref_model"].get("fingerprint"):
            bad("ref_model", "stored reference log-probs without ref_model.fingerprint")
    mia = row.get("mia") if isinstance(row.get("mia"), dict) else {}
    return {"id": row["id"], "images": imgs, "prompt": row["prompt"], "chosen": row["chosen"],
            "rejected": row["rejected"], "format": str(mia.get("format", "unknown")),
            "n_images": int(mia.get("n_images", len(imgs))), "ref": ref,
            "ref_fingerprint": (row.get("ref_model") or {}).get("fingerprint")}


def _tokens_per_image(processor, size):
    from PIL import Image

    ids = processor(text=["<image>"], images=[[Image.new("RGB", size)]], add_special_tokens=False)["input_ids"][0]
    return len(ids)


def pick_reference(pairs, mode, fingerprint, lora):
    """-> "stored" | "adapters-disabled" | "frozen-copy", or SystemExit saying why not."""
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
    return "stored"


def collate(pairs, image_root, processor, device, dtype, prefix_sharing=False):
    """B pairs -> one batch of 2B rows: chosen rows first, then rejected (one forward for both);
    with prefix_sharing, B rows [prompt | chosen | rejected] (build_shared_prefix_batch)."""
    images = [[common.load_image(image_root, rel) for rel in p["images"]] for p in pairs]
    prompts = [p["prompt"] for p in pairs]
    batch = common.build_inputs(processor, prompts * 2, images * 2,
                                answers=[p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    batch = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return build_shared_prefix_batch(batch, dtype) if prefix_sharing else batch


def make_scorer(model):
    """A module whose forward is score_pairs (common.response_logps on a plain batch, or
    shared_prefix_logps on a prefix-shared one), so DDP's hooks wrap the whole computation."""
    import torch

    class PairScorer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch):  # -> summed log-probs (2B,), scored tokens (2B,)
            return score_pairs(self.m, batch)

    return PairScorer(model)


# ---- fast path (issue 6): one [prompt | chosen | rejected] row per pair -------------------------
def build_shared_prefix_batch(batch, dtype):
    """Plain batch of 2B rows [chosen; rejected] (common.build_inputs, right-padded) -> B rows
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
        keep_c = (labels[i, p:c_end] != common.IGNORE_INDEX).tolist()
        keep_r = (labels[B + i, p:r_end] != common.IGNORE_INDEX).tolist()
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
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"][: batch["pixel_values"].shape[0] // 2]  # chosen rows' images
    return out


def shared_prefix_logps(model, batch):
    """Summed answer log-probs of a build_shared_prefix_batch batch, LM head only at scored positions.

    returns: (sums (2B,), n_tokens (2B,)) in [chosen; rejected] order, as common.response_logps's
    (sums, n) on the plain batch. `batch` may carry `mm_encoder_outputs` (image features computed
    once, see encode_images) instead of pixel_values.
    """
    import torch

    inputs = {k: v for k, v in batch.items() if not k.startswith("score_")}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch["score_src"]]  # (N, H)
    lp = common.logps_at(model, h, batch["score_tgt"])  # (N,)
    n_rows = 2 * hidden.shape[0]
    sums = torch.zeros(n_rows, dtype=lp.dtype, device=lp.device).index_add(0, batch["score_row"], lp)
    n = torch.bincount(batch["score_row"], minlength=n_rows)
    return sums, n


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
    pv = batch.pop("pixel_values")
    plain = "score_src" not in batch
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv[: pv.shape[0] // 2] if plain else pv, return_dict=True)
    if plain:  # the same images again for the rejected rows
        po = feats.pooler_output
        feats.pooler_output = torch.cat([po, po]) if torch.is_tensor(po) else type(po)(list(po) * 2)
    batch["mm_encoder_outputs"] = {"image": feats}
    return batch


def score_pairs(model, batch):
    """-> (summed log-probs (2B,), scored tokens (2B,)) for [chosen; rejected], whichever layout."""
    if "score_src" in batch:
        return shared_prefix_logps(model, batch)
    sums, _, n = common.response_logps(model, batch)
    return sums, n


def step_records(pairs, losses, cr, rr, pc, pr, rc, rrl):
    """One small dict per pair (gathered across ranks for the log and its breakdown)."""
    cols = [t.detach().float().cpu().tolist() for t in (losses, cr, rr, pc, pr, rc, rrl)]
    keys = ("loss", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected",
            "ref_logps_chosen", "ref_logps_rejected")
    return [{"format": p["format"], "n_images": p["n_images"], **dict(zip(keys, vals))}
            for p, *vals in zip(pairs, *cols)]


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
            f"chosen {row['reward_chosen']:+.3f} | rejected {row['reward_rejected']:+.3f} | lr {row['lr']:.1e} | "
            f"{row['ms']:.0f} ms | acc by format {fmt} | by images {imgs}")


def save_checkpoint(out, step, scorer, model, optimizer, scheduler, state, rank, world, fsdp):
    """OUT/checkpoints/step-NNNNNN/: trainable weights, optimizer, scheduler, every rank's RNG
    states and the step (the data position follows from it). Written to a temporary folder and
    renamed, so a crash mid-save leaves the previous checkpoint as the latest."""
    import numpy as np
    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    rngs = gather(rng, world)
    trainable, optim = full_state(scorer, model, optimizer, rank, fsdp)
    final = Path(out) / "checkpoints" / f"step-{step:06d}"
    if rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"trainable": trainable, "optimizer": optim, "scheduler": scheduler.state_dict(), "fsdp": fsdp,
                    "rng": rngs, "step": step, **state}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = state["args"].get("keep_checkpoints") or 0
        done = sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return final


def load_checkpoint(path, scorer, model, optimizer, scheduler, rank, world, fsdp):
    """Restore a save_checkpoint folder -> the number of optimizer steps already taken."""
    import numpy as np
    import torch

    if not (Path(path) / "trainer_state.pt").is_file():
        raise SystemExit(f"06_train_dpo: --resume {path}: not a checkpoint folder (no trainer_state.pt)")
    ck = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    missing = set(ck["trainable"]) - {n for n, _ in model.named_parameters()}
    if missing:
        raise SystemExit(f"06_train_dpo: checkpoint {path} holds weights this model lacks, e.g. {sorted(missing)[:3]} "
                         f"(resume with the same --model and LoRA settings)")
    if ck.get("fsdp", False) != fsdp:
        raise SystemExit(f"06_train_dpo: checkpoint {path} was written {'with' if ck.get('fsdp') else 'without'} --fsdp; resume the same way")
    if fsdp:  # every rank reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(scorer, {"m." + n: t for n, t in ck["trainable"].items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(scorer, optimizer, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in ck["trainable"].items():
                params[n].copy_(t)
        optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    rng = ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["step"]


def full_state(scorer, model, optimizer, rank, fsdp, only_trainable=True):
    """-> (trainable [or all] weights by name, optimizer state), whole tensors on rank 0 (None
    elsewhere). Under FSDP every rank must call it: the shards are gathered."""
    if not fsdp:
        if rank != 0:
            return None, None
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {"m." + n for n, p in model.named_parameters() if p.requires_grad}  # scorer.m is the model
    weights = {k[2:]: v for k, v in get_model_state_dict(scorer, options=opts).items() if k in names or not only_trainable}
    return weights, optimizer and get_optimizer_state_dict(scorer, optimizer, options=opts)


def shard(scorer):
    """FSDP2 (full fine-tuning of large models): each decoder layer is one unit, the rest (vision
    tower, projector, embeddings, head) the root; the scorer is the root so its forward gathers."""
    from torch.distributed.fsdp import fully_shard

    for layer in scorer.m.model.language_model.layers:
        fully_shard(layer)
    return fully_shard(scorer)


def latest_checkpoint(out):
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


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


def main(args):
    import numpy as np
    import torch

    t_start = time.time()
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # same on every rank: LoRA's random init agrees before DDP's broadcast
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.pairs).is_file():
        raise SystemExit(f"06_train_dpo: {args.pairs}: no such file. Make pairs first (python 04_gen_pairs.py, "
                         f"then python 05_post_select.py) or pass --pairs.")
    global_batch = args.batch_size * args.grad_accum * world
    if args.fsdp and (args.lora_r > 0 or world == 1):
        raise SystemExit("06_train_dpo: --fsdp shards a full fine-tune (--lora-r 0) across torchrun processes")

    # -- model, reference, data
    model, processor = common.load_model(args.model, dtype=args.dtype, device=device)
    fingerprint = common.model_fingerprint(model)  # of the base model, before any adapter
    pairs, skips = load_pairs(args.pairs, args.image_root, processor, args.max_length, args.on_error)
    if len(pairs) < global_batch:
        raise SystemExit(f"06_train_dpo: {len(pairs)} usable pairs, fewer than one global batch ({global_batch})")
    reference = pick_reference(pairs, args.ref_logps, fingerprint, args.lora_r > 0)
    policy, ref_model = _prepare_policy(model, args, reference)
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    scorer = make_scorer(model)  # `model` carries the LoRA layers in place when peft wrapped it
    ref_scorer = make_scorer(ref_model) if ref_model is not None else None
    if args.fsdp:
        scorer, ref_scorer = shard(scorer), ref_scorer and shard(ref_scorer)
    elif world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(scorer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # features can be shared only while no gradient needs to reach the vision tower / projector
    encode_once = args.encode_images_once and not (args.tune_vision or args.tune_projector or args.fsdp)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = len(pairs) // global_batch
    total = args.max_steps or args.epochs * per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))

    out, log_path = Path(args.out), Path(args.out) / "log.jsonl"
    resume = latest_checkpoint(out) if args.resume == "auto" else args.resume
    step = load_checkpoint(resume, scorer, policy, optimizer, scheduler, rank, world, args.fsdp) if resume else 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        old = [r for _, r in common.read_rows(log_path)] if resume and log_path.is_file() else []
        common.write_jsonl(log_path, [r for r in old if r.get("step", 0) <= step])  # drop steps after the checkpoint
    n_train = sum(p.numel() for p in trainable)
    say(f"06_train_dpo: {len(pairs)} pairs ({len(skips)} skipped: {skips.summary()}) | {world} process(es) x "
        f"{args.batch_size} pairs x {args.grad_accum} accumulation = {global_batch} per step | {total} steps "
        f"({per_epoch}/epoch) | {'LoRA r ' + str(args.lora_r) if args.lora_r else 'full fine-tune'}, "
        f"{n_train / 1e6:.2f}M trainable | reference: {reference} (model {fingerprint}) | "
        f"{'prefix-shared' if args.prefix_sharing else 'plain'} rows{', images encoded once' if encode_once else ''}"
        + (f" | resumed at step {step} from {resume}" if resume else ""))

    # -- train
    policy.train()
    status, state = "done", {"args": vars(args), "reference": reference, "fingerprint": fingerprint}
    while step < total:
        t0 = time.time()
        recs = []
        for micro in range(args.grad_accum):
            idx = pair_order(len(pairs), args.seed, step, global_batch, rank, world, micro, args.grad_accum)
            batch_pairs = [pairs[i] for i in idx]
            batch = collate(batch_pairs, args.image_root, processor, device, model.dtype, args.prefix_sharing)
            if encode_once:  # image features once per step, shared by policy and reference
                batch = encode_images(model, batch)
            ref_c, ref_r = reference_logps(batch, batch_pairs, reference, model, policy, ref_scorer, device)
            last = micro == args.grad_accum - 1  # gradients are averaged across processes only then
            if args.fsdp:
                scorer.set_requires_gradient_sync(last)
            sync = scorer.no_sync() if world > 1 and not args.fsdp and not last else contextlib.nullcontext()
            with sync:
                logps, n_tok = scorer(batch)
                pc, pr = logps.float().chunk(2)  # (B,) each: chosen rows first, then rejected
                nc, nr = n_tok.chunk(2)
                rc, rr = ref_c.float(), ref_r.float()
                if args.loss == "ipo":  # subtle: IPO on length-averaged log-probs (IPO authors, TRL)
                    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
                losses, cw, rw = dpo_loss(pc, pr, rc, rr, args.beta, args.loss, args.label_smoothing)
                total_loss = mia_dpo_loss(losses, logps.float().chunk(2)[0], nc, args.dpo_alpha, args.gamma)
                (total_loss.mean() / args.grad_accum).backward()
            recs += step_records(batch_pairs, total_loss, cw, rw, pc, pr, rc, rr)
        recs = [r for rs in gather(recs, world) for r in rs]
        if not all(math.isfinite(r["loss"]) for r in recs):  # every rank sees the same gathered numbers
            optimizer.zero_grad(set_to_none=True)
            where = save_checkpoint(out, step, scorer, policy, optimizer, scheduler, state, rank, world, args.fsdp)
            status = f"non-finite loss at step {step + 1}; state before it saved to {where}"
            break
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "epoch": (step - 1) // per_epoch + 1, "lr": lr, "ms": 1000 * (time.time() - t0), **summarise(recs)}
        if master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(log_line(row, total), flush=True)
        if args.save_every and (step % args.save_every == 0 or step == total):
            save_checkpoint(out, step, scorer, policy, optimizer, scheduler, state, rank, world, args.fsdp)

    # -- save
    weights = full_state(scorer, policy, None, rank, True, False)[0] if args.fsdp and status == "done" else None
    if master:
        saved = _save_final(policy, processor, out, args, weights) if status == "done" else None
        if args.plot and log_path.is_file() and log_path.stat().st_size:
            plot_curves(log_path, out / "curves.png")
        common.write_sidecar(log_path, args, counts={"pairs_read": len(pairs) + len(skips), "pairs_used": len(pairs),
                             "steps": step, "world_size": world}, skips=skips, reference=reference,
                             model_fingerprint=fingerprint, status=status, saved=saved)
        print(f"06_train_dpo: {status} in {time.time() - t_start:.0f} s, {step} steps -> {out}"
              + (f" ({', '.join(saved)})" if saved else ""))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if status != "done":
        raise SystemExit(f"06_train_dpo: {status}")
    return out


def _prepare_policy(model, args, reference):
    """-> (policy, frozen reference copy or None). LoRA on every language-model linear layer, or a
    full fine-tune; the vision tower and projector stay frozen unless --tune-vision/--tune-projector."""
    import torch

    if args.lora_r > 0 and (args.tune_vision or args.tune_projector) and reference == "adapters-disabled":
        raise SystemExit("06_train_dpo: with LoRA the reference is the model with its adapters disabled, which would "
                         "share the vision tower/projector being trained; use --lora-r 0 (a frozen copy) or stored log-probs")
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lm = model.model.language_model
        targets = [f"model.language_model.{n}" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets)
        policy = get_peft_model(model, cfg)
        frozen = None
    else:
        frozen = None if reference == "stored" else copy.deepcopy(model).eval().requires_grad_(False)
        policy = model
    for name, module in (("vision_tower", args.tune_vision), ("multi_modal_projector", args.tune_projector)):
        getattr(model.model, name).requires_grad_(bool(module))
    return policy, frozen


def reference_logps(batch, batch_pairs, reference, model, policy, ref_scorer, device):
    """Reference summed log-probs (B,), (B,) for chosen and rejected: stored, or one no-grad forward."""
    import torch

    if reference == "stored":
        ref = torch.tensor([p["ref"] for p in batch_pairs], dtype=torch.float64, device=device)  # (B, 2)
        return ref[:, 0], ref[:, 1]
    with torch.no_grad(), (policy.disable_adapter() if reference == "adapters-disabled" else contextlib.nullcontext()):
        sums = score_pairs(model, batch)[0] if reference == "adapters-disabled" else ref_scorer(batch)[0]
    return sums.chunk(2)


def _save_final(policy, processor, out, args, weights=None):
    """LoRA: OUT/adapter (peft) and, with --merge, OUT/final (merged); full fine-tune: OUT/final
    (under FSDP from `weights`, the state dict gathered from every shard)."""
    saved = []
    if args.lora_r > 0:
        policy.save_pretrained(out / "adapter")
        processor.save_pretrained(out / "adapter")
        saved.append(str(out / "adapter"))
        if not args.merge:
            return saved
        policy = policy.merge_and_unload()
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
    processor.save_pretrained(tmp)
    shutil.rmtree(out / "final", ignore_errors=True)
    tmp.rename(out / "final")
    return saved + [str(out / "final")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--pairs", default="data/toy/pairs.post.jsonl", help="pairs JSONL from 05 (or 04)")
    g.add_argument("--image-root", default="data/toy/images")
    g.add_argument("--model", default="models/toy-llava", help="local HF model directory (policy and reference)")
    g.add_argument("--out", default="out/dpo-toy", help="output directory")
    g.add_argument("--max-length", type=int, default=4096, help="drop (and count) pairs longer than this, images expanded")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad pairs: list and stop, or count and drop")
    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=("sigmoid", "ipo"), default="sigmoid")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss only)")
    g.add_argument("--dpo-alpha", type=float, default=1.0, help="weight of the DPO term")
    g.add_argument("--gamma", type=float, default=0.0, help="weight of the SFT term on chosen (paper: 0)")
    g.add_argument("--ref-logps", choices=("auto", "stored", "recompute"), default="auto",
                   help="reference: stored in the pairs (only if their fingerprint matches), or computed by the model")
    g.add_argument("--lora-r", type=int, default=128, help="LoRA rank; 0 = full fine-tune (reference: a frozen copy)")
    g.add_argument("--lora-alpha", type=int, default=256)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--tune-vision", action="store_true", help="train the vision tower too (full fine-tune)")
    g.add_argument("--tune-projector", action="store_true", help="train the projector too (full fine-tune)")
    g.add_argument("--encode-images-once", action=argparse.BooleanOptionalAction, default=True,
                   help="vision tower + projector run once per step (no grad), features reused by chosen, rejected "
                        "and the reference (off by itself with --tune-vision/--tune-projector/--fsdp)")
    g.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=True,
                   help="one [prompt | chosen | rejected] row per pair with a block mask: the prompt and its "
                        "images run once per pair (same log-probs and gradients as the plain path)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=2, help="pairs per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs)")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (memory for compute)")
    g.add_argument("--fsdp", action="store_true", help="full fine-tune sharded across torchrun processes (FSDP2)")
    g.add_argument("--dtype", choices=common.DTYPES, default="float32", help="weights dtype (LoRA adapters stay float32)")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end); 0: never")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last N checkpoints (0: all)")
    g.add_argument("--resume", default=None, help="checkpoint folder, or 'auto' for OUT's latest")
    g.add_argument("--merge", action="store_true", help="LoRA: also save the merged model to OUT/final")
    g.add_argument("--plot", action="store_true", help="draw OUT/curves.png from the log")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
