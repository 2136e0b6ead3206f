"""
prefix_sharing.py — 06_train_dpo.py's fast path: the same log-probs as the plain path, about 2x faster.

The plain path (06's concatenated_forward) runs 2B rows per B pairs, [chosen; rejected], and each
row carries the whole prompt: its hundreds of visual tokens per image go through the decoder twice,
and the vision tower runs on every image twice, for the policy and again for the reference.
Chosen and rejected share that prompt token for token, so the fast path runs it once:

  1. prefix sharing (build_shared_prefix_batch, shared_prefix_forward): one row per pair,
       [prompt | chosen | rejected]
     with positions 0..p-1 | p..p+c-1 | p..p+r-1 and a block mask in which rejected tokens see the
     prompt and each other but never the chosen ones. Every rejected query then has exactly the
     keys, values and positions it had in its own plain row, so its hidden states, log-probs and
     gradients are the plain path's up to float rounding (attention is a sum over keys: a masked
     key adds exp(-inf) = 0). The first rejected token is scored from the prompt's last position,
     as the first chosen one is. Prefix sharing for preference pairs: Wang et al. 2024,
     "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv 2410.20305).
  2. images encoded once (encode_images): while the vision tower and projector are frozen, their
     features depend on nothing being trained, so they are computed once per batch, without
     gradient, and handed to the policy's and the reference's forward (`mm_encoder_outputs`).

Exact for decoders whose attention is full causal softmax attention over 1-D positions, i.e. where
a token's output depends only on the keys it may see and on its own position id. fast_path_blocker
names the families where that is not so, and 06 trains them on the plain path, saying why:
M-RoPE (Qwen2-VL ... Qwen3.5: the model computes 3-D positions itself from the token layout),
sliding-window layers (Gemma 3/4: a second mask the single block mask is not), linear-attention
layers (a recurrent state reads every earlier token), and per-token inputs the processor makes
(e.g. bidirectional attention inside images). Extending the layout to those is future work.
06 checks the fast path against the plain one on its first batch (self_check) and stops rather
than train on numbers the plain path would not give. tests/test_prefix_sharing.py and
tests/test_families.py compare log-probs and gradients with the plain path to 1e-4.
"""
from __future__ import annotations

import inspect

import vlm


# ---- 1. one row per pair: [prompt | chosen | rejected] -------------------------------------------
def build_shared_prefix_batch(batch, dtype):
    """Plain batch of 2B rows [chosen; rejected] (06's collate, right-padded) -> B rows
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
    """06's concatenated_forward for a build_shared_prefix_batch batch: the same four (B,) tensors
    (chosen logps, rejected logps, chosen n tokens, rejected n tokens), with the LM head applied
    only at the scored positions. `batch` may carry `mm_encoder_outputs` (image features computed
    once, see encode_images) instead of pixel_values."""
    import torch

    inputs = {k: v for k, v in batch.items() if not k.startswith("score_")}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch["score_src"]]  # (N, H)
    lp = vlm.logps_at(model, h, batch["score_tgt"])  # (N,)
    n_rows = 2 * hidden.shape[0]
    summed = torch.zeros(n_rows, dtype=lp.dtype, device=lp.device).index_add(0, batch["score_row"], lp)  # (2B,)
    n_tokens = torch.bincount(batch["score_row"], minlength=n_rows)  # (2B,)
    chosen_logps, rejected_logps = summed.float().chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_n, rejected_n


# ---- 2. images encoded once ----------------------------------------------------------------------
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


# ---- what 06 calls: the layout, when it is exact, and a check ------------------------------------
def lay_out(model, batch, share_prefix=True, encode_once=True):
    """A plain [chosen; rejected] batch -> the batch a step trains on: one prefix-shared row per
    pair and/or the images' features computed once (shared by the policy and the reference)."""
    if share_prefix:
        batch = build_shared_prefix_batch(batch, model.dtype)
    if encode_once:
        batch = encode_images(model, batch)
    return batch


def fast_path_blocker(model, batch):
    """Why the fast path cannot give the plain path's numbers for this model, or None.
    `batch`: a plain batch (06's collate: what the processor makes for this family)."""
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


def self_check(scorer, model, plain, share_prefix=True, encode_once=True, tol=None):
    """The fast path against the plain path on one batch, no grad -> the largest difference of the
    summed log-probs; SystemExit when it is above tolerance (float32: 1e-4 relative + 1e-3).
    `scorer(batch)` -> (chosen logps, rejected logps, ...) for either layout (train_state.make_scorers:
    under FSDP only its forward gathers the sharded weights); `plain`: a collate() batch."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        want = torch.cat(scorer(plain)[:2])  # (2B,)
        got = torch.cat(scorer(lay_out(model, plain, share_prefix, encode_once))[:2])
    model.train(was)
    rtol, atol = tol or ((1e-4, 1e-3) if model.dtype == torch.float32 else (2e-2, 0.5))
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise SystemExit(f"06_train_dpo: the fast path's log-probs differ from the plain path's by {diff:.3g} on the "
                         f"first batch (tolerance {rtol:g} relative + {atol:g}); this model needs "
                         f"--no-prefix-sharing --no-encode-images-once")
    return diff
