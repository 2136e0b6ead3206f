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

Exact wherever a token's output depends only on the keys it may see and on its own position, and
both can be given to the model from outside (a mask and position_ids). Two families need more
than 1-D positions and one mask; fit_to_model re-lays what their decoders read, derived from the
model's config and forward, not from its name:
  3. M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the model computes (t, h, w) positions from the
     token layout itself (get_rope_index) only when position_ids is None. They are computed on
     the plain [chosen; rejected] rows with the model's own get_rope_index, and the shared row
     takes the chosen row's for prompt + chosen and the rejected row's from the prompt's end on:
     each token keeps the positions it had, images included (they sit in the prompt).
  4. per-layer-type masks (Gemma 3, Gemma 4): sliding-window layers see keys less than
     config.sliding_window positions back, and image blocks (runs of image tokens) attend both
     ways (Gemma 3 in every layer, Gemma 4 in its sliding layers). The window is measured in
     positions, not indices: a rejected token sits c (chosen length) indices further from the
     prompt than in its plain row. So each mask is the plain row's rule evaluated at every
     token's plain (row, column), allowed only between tokens of one plain row (a prompt token
     belongs to both), and the model gets {"full_attention": m, "sliding_attention": m}, which
     its forward uses instead of building masks from token_type_ids / mm_token_type_ids.
Not exact, so on the plain path (fast_path_blocker says why, 06 logs it): linear-attention layers
(Qwen3.5's Gated DeltaNet: a recurrent state runs through every earlier token, chosen ones
included, and no mask reaches it), prefix-LMs (PaliGemma: its prompt attends both ways; its forward
builds both layer types' masks from one tensor, so none per layer type reaches its sliding layers),
per-token inputs it does not know, attention kernels that take no 4-D mask (flash / flex), Llama 4's
chunked attention (no chunked mask is built) and attention temperature tuning (queries scaled by
their index in the row, which position_ids do not reach).
Qwen3-VL's DeepStack features are per image like the pooled ones, so encode_images duplicates both
for plain rows.
06 checks the fast path against the plain one on its first batch (self_check) and stops rather
than train on numbers the plain path would not give. tests/test_prefix_sharing.py and
tests/test_families.py compare log-probs and gradients with the plain path to 1e-4, the latter on
every family of tests/tiny_families.py that takes the fast path, Gemma's also with a sliding
window shorter than the prompt.
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
         per-token inputs (token types: mm_token_type_ids, token_type_ids): token by token, as input_ids
         score_src (N,) flat index into (B*T) of the hidden state that predicts score_tgt (N,),
         score_row (N,) its output row in [chosen; rejected] order (0..2B-1); N = all answer tokens.
    A 4-D mask goes through transformers 5's masking_utils untouched (`_preprocess_mask_arguments`
    returns it as-is), and an additive float mask is what both eager (`weights + mask`) and SDPA take.
    Decoders that read M-RoPE positions or one mask per layer type: fit_to_model replaces
    position_ids / attention_mask (lay_out runs both).
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
        if not torch.is_tensor(v):
            raise ValueError(f"the fast path cannot re-lay the input {k!r}; use the plain path")
        if v.shape[:2] == ids.shape:  # a per-token input (token types): taken token by token, as input_ids
            src = plain_sources(batch).to(v.device)  # (B, T)
            out[k] = v.flatten(0, 1)[src.clamp(min=0)]  # (B, T, ...)
            out[k][src < 0] = 0
            continue
        out[k] = v[: v.shape[0] // 2]  # subtle: rows [chosen; rejected] hold the same images, chosen first
    return out


def plain_sources(batch):
    """Where each token of the prefix-shared layout comes from in the plain batch: (B, T) flat
    indices into its (2B * T0) tokens (row * T0 + column), -1 on padding. [prompt | chosen] is the
    chosen row's columns 0..p+c-1, [rejected] the rejected row's columns p..p+r-1; the same order
    and length build_shared_prefix_batch lays out. The column is the token's 1-D position in its
    plain row (06's rows are right-padded), which is what the sliding window measures."""
    import torch

    plens, lens = batch["prompt_lens"].tolist(), batch["attention_mask"].sum(-1).tolist()
    B, T0 = batch["input_ids"].shape[0] // 2, batch["input_ids"].shape[1]
    rows = [torch.cat([torch.arange(lens[i]) + i * T0, torch.arange(plens[i], lens[B + i]) + (B + i) * T0])
            for i in range(B)]
    src = torch.full((B, max(len(x) for x in rows)), -1, dtype=torch.long)
    for i, x in enumerate(rows):
        src[i, :len(x)] = x
    return src


def shared_prefix_forward(model, batch):
    """06's concatenated_forward for a build_shared_prefix_batch batch: the same four (B,) tensors
    (chosen logps, rejected logps, chosen n tokens, rejected n tokens), with the LM head applied
    only at the scored positions. `batch` may carry `mm_encoder_outputs` (image features computed
    once, see encode_images) instead of pixel_values."""
    import torch

    inputs = {k: v for k, v in batch.items() if not k.startswith("score_")}
    hidden = vlm.last_hidden_state(model, {**inputs, "use_cache": False})  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch["score_src"]]  # (N, H)
    lp = vlm.logps_at(model, h, batch["score_tgt"])  # (N,)
    n_rows = 2 * hidden.shape[0]
    summed = torch.zeros(n_rows, dtype=lp.dtype, device=lp.device).index_add(0, batch["score_row"], lp)  # (2B,)
    n_tokens = torch.bincount(batch["score_row"], minlength=n_rows)  # (2B,)
    chosen_logps, rejected_logps = summed.float().chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_n, rejected_n


# ---- 1b. the positions and masks the decoder reads, where 1-D positions and one mask are not all ----
def decoder_rules(model, batch):
    """What the model's decoder reads besides the tokens, for a plain batch `batch`, from its config
    and forward (transformers 5 sources):
      rope_index   the model computes its positions itself from the token layout (M-RoPE:
                   `get_rope_index` of modeling_qwen2_vl / qwen2_5_vl / qwen3_vl), so the shared row
                   needs them computed on the plain rows and re-laid.
      layer_types  text config `layer_types` (default all "full_attention"); "sliding_attention"
                   layers see keys within `window` = config.sliding_window positions
                   (masking_utils.sliding_window_overlay: key > query - window).
      blocks       the per-token input that marks image blocks the model lets attend both ways, and
                   the layer types that do: Gemma 3 (modeling_gemma3.create_masks_for_vision_model,
                   from `token_type_ids`, which its forward takes) in every layer; Gemma 4
                   (modeling_gemma4.create_masks_for_vision_model, from `mm_token_type_ids` when
                   text config use_bidirectional_attention == "vision") in sliding layers only.
    """
    text = model.config.get_text_config()
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"])
    base = getattr(model, "model", model)  # the base model; Llama 4 has none: its own forward
    forward = inspect.signature(base.forward).parameters
    if getattr(text, "use_bidirectional_attention", None) == "vision" and "mm_token_type_ids" in batch:
        blocks = ("mm_token_type_ids", {"sliding_attention"})
    elif "token_type_ids" in forward and "token_type_ids" in batch:
        blocks = ("token_type_ids", set(layer_types))
    else:
        blocks = None
    return {"rope_index": hasattr(base, "get_rope_index"), "layer_types": layer_types,
            "window": getattr(text, "sliding_window", None), "blocks": blocks}


def fit_to_model(model, plain, shared):
    """build_shared_prefix_batch's layout (1-D positions, one mask) -> the positions and masks this
    model's decoder reads, each token keeping exactly what it had in its plain row:
      position_ids (3, B, T) where the model computes M-RoPE positions itself: its own
          get_rope_index on the plain [chosen; rejected] batch, then prompt + chosen take the chosen
          row's, rejected the rejected row's from the prompt's end on (padding 0). Images sit in the
          prompt, so their (t, h, w) positions are the same in both rows.
      attention_mask {layer type: (B, 1, T, T)} where layer types differ (sliding windows) or image
          blocks attend both ways: the plain row's rule evaluated at each token's plain coordinates
          (row, column = 1-D position), allowed only between tokens of one plain row (a prompt
          token belongs to both). So a rejected query and a prompt key are measured by the rejected
          row's distance, not the shared row's (c indices more), and a rejected token never sees a
          chosen one. Gemma 3/4's forwards take such a dict as is and then build no mask of their
          own (a 4-D tensor goes through Qwen's create_causal_mask unchanged).
    Otherwise (LLaVA-style decoders) `shared` is returned as built."""
    import torch

    rules = decoder_rules(model, plain)
    per_type = rules["blocks"] is not None or len(set(rules["layer_types"])) > 1 or (
        "sliding_attention" in rules["layer_types"])
    if not rules["rope_index"] and not per_type:
        return shared
    shared, dev = dict(shared), plain["input_ids"].device
    src = plain_sources(plain).to(dev)  # (B, T) flat index into the plain (2B * T0) tokens, -1 = padding
    real, at = src >= 0, src.clamp(min=0)
    if rules["rope_index"]:
        takes = inspect.signature(model.model.get_rope_index).parameters
        pos = model.model.get_rope_index(**{k: v for k, v in plain.items() if k in takes})[0]  # (3, 2B, T0)
        shared["position_ids"] = pos.flatten(1)[:, at].masked_fill(~real, 0)  # (3, B, T)
    if per_type:
        T0 = plain["input_ids"].shape[1]
        row, col = at // T0, at % T0  # (B, T) plain row and column (= 1-D position) of each token
        prompt = col < plain["prompt_lens"].to(dev)[row]  # (B, T)
        q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))  # (B, T, 1), (B, 1, T)
        same_row = (row[q] == row[k]) | prompt[k]  # (B, T, T): a prompt key is in both rows
        base = same_row & real[k]
        causal = col[k] <= col[q]
        if rules["blocks"] is not None:
            key, block_types = rules["blocks"]
            block = image_blocks(plain[key]).flatten()[at]  # (B, T) image block id per token, -1 = none
            both_ways = (block[q] == block[k]) & (block[q] >= 0)
        masks = {}
        for t in dict.fromkeys(rules["layer_types"]):
            allowed = causal | both_ways if rules["blocks"] is not None and t in block_types else causal
            if t == "sliding_attention":
                allowed = allowed & (col[k] > col[q] - rules["window"])
            allowed = (base & allowed) | torch.eye(src.shape[1], dtype=torch.bool, device=dev)  # padding queries see themselves
            masks[t] = torch.zeros(allowed.shape, dtype=model.dtype, device=dev).masked_fill_(
                ~allowed, torch.finfo(model.dtype).min)[:, None]  # (B, 1, T, T) additive
        shared["attention_mask"] = masks
    return shared


def image_blocks(token_types):
    """(N, T) token types (1 image, 2 video) -> (N, T) block ids: each run of image or video tokens
    one id, -1 elsewhere (as get_block_sequence_ids_for_mask in modeling_gemma3 / modeling_gemma4)."""
    import torch

    vision = (token_types == 1) | (token_types == 2)
    start = vision & ~torch.nn.functional.pad(vision, (1, 0))[:, :-1]
    return torch.where(vision, start.long().cumsum(-1) - 1, -1)


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
        if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL: per LM layer, per image
            feats.deepstack_features = [type(f)(list(f) * 2) for f in feats.deepstack_features]
    batch["mm_encoder_outputs"] = {"image": feats}
    return batch


# ---- what 06 calls: the layout, when it is exact, and a check ------------------------------------
def lay_out(model, batch, share_prefix=True, encode_once=True):
    """A plain [chosen; rejected] batch -> the batch a step trains on: one prefix-shared row per
    pair and/or the images' features computed once (shared by the policy and the reference)."""
    if share_prefix:
        batch = fit_to_model(model, batch, build_shared_prefix_batch(batch, model.dtype))
    if encode_once:
        batch = encode_images(model, batch)
    return batch


def fast_path_blocker(model, batch):
    """Why the fast path cannot give the plain path's numbers for this model, or None.
    `batch`: a plain batch (06's collate: what the processor makes for this family)."""
    import torch

    rules = decoder_rules(model, batch)
    other = sorted(set(rules["layer_types"]) - {"full_attention", "sliding_attention", "chunked_attention"})
    if other:  # Qwen3.5's Gated DeltaNet: no mask reaches a recurrent state
        return (f"its {'/'.join(other)} layers carry a recurrent state through every earlier token, which no "
                f"attention mask can keep the chosen answer out of")
    typed = {k: v for k, v in vlm.response_types(model, batch).items() if v}  # PaliGemma: {"token_type_ids": 1}
    if typed:  # generated text typed apart from the prompt's text (0): the prompt is a bidirectional prefix
        return (f"it is a prefix-LM (its prompt attends both ways, generated tokens have "
                f"{', '.join(f'{k} {v}' for k, v in typed.items())}): the shared row's masks lay out image blocks, "
                f"not a prefix")
    if "chunked_attention" in rules["layer_types"]:  # Llama 4's RoPE layers (masking_utils.chunked_overlay)
        return ("its chunked_attention layers see only the keys in the query's chunk of positions, and no "
                "chunked mask is built for the shared row")
    if getattr(model.config.get_text_config(), "attn_temperature_tuning", False):  # Llama 4's NoPE layers
        return ("its attention temperature tuning scales each query by the token's index in its row (a step every "
                "floor_scale tokens), not by position_ids: in the shared row a rejected token sits a chosen "
                "answer further on")
    per_token = [k for k, v in batch.items() if torch.is_tensor(v) and v.shape[:2] == batch["input_ids"].shape
                 and k not in ("input_ids", "attention_mask", "labels")]  # (B, T, ...): Mllama's cross_attention_mask
    read = {"mm_token_type_ids"} if rules["rope_index"] else set()  # the rope index reads them
    read |= {rules["blocks"][0]} if rules["blocks"] else set()
    if set(per_token) - read:
        return f"its per-token inputs {sorted(set(per_token) - read)} are not re-laid for the shared row"
    if rules["rope_index"] and "mm_token_type_ids" not in batch:
        return "its M-RoPE rope index needs mm_token_type_ids, which the processor did not give"
    if "sliding_attention" in rules["layer_types"] and not rules["window"]:
        return "it has sliding-window layers but no config.sliding_window"
    attn = model.config.get_text_config()._attn_implementation
    if attn not in ("sdpa", "eager"):
        return f"its attention ({attn}) takes no 4-D mask"
    return None


def describe(model, batch):
    """One line for 06's log: what the fast path re-lays for this model (plain batch `batch`)."""
    rules, parts = decoder_rules(model, batch), []
    if rules["rope_index"]:
        parts.append("M-RoPE positions from the model's rope index on the plain rows")
    if "sliding_attention" in rules["layer_types"]:
        parts.append(f"sliding-window masks ({rules['window']} positions, measured in each plain row)")
    if rules["blocks"]:
        parts.append(f"image blocks attending both ways in {'/'.join(sorted(rules['blocks'][1]))} layers")
    return "; ".join(parts) or "1-D positions, one block mask"


def choose_path(model, batch, share_prefix, encode_once, master):
    """The fast path's two halves as 06 was asked for them, unless fast_path_blocker says this model cannot
    take them exactly -> (share_prefix, encode_once); 06's log says which path runs and why."""
    why = fast_path_blocker(model, batch)
    if why and (share_prefix or encode_once) and master:
        print(f"06_train_dpo: plain path ([chosen; rejected] rows), not the fast path, for {type(model).__name__}: {why}")
    elif share_prefix and master:
        print(f"06_train_dpo: fast path for {type(model).__name__}: {describe(model, batch)}")
    return share_prefix and not why, encode_once and not why


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
