"""
train_state.py — the weights 06_train_dpo.py trains, kept out of its reading path: which ones
(LoRA adapters or the whole model, vision tower and projector frozen), how they are spread over
processes (DDP, FSDP2), and how they reach the disk so that a run resumes exactly.

  prepare_policy        LoRA (peft) on every language-model linear layer, or a full fine-tune
                        (+ a frozen copy as the reference when no stored log-probs are used)
  make_scorers, gather  DDP averages gradients in the backward; FSDP2 (`fully_shard`) gives each
                        rank a shard of every weight and of the optimizer state
  OUT/checkpoints/step-NNNNNN/trainer_state.pt   trainable weights, optimizer, schedule, every rank's
                        RNG states and the step (the data position follows from it: 06's
                        pair_order is a function of seed and step alone); resume() restores it
  OUT/adapter/          LoRA: the peft adapter (+ processor)
  OUT/final/            merged LoRA (--merge) or the full fine-tune, as 04 and 07 load it
  OUT/curves.png        loss, reward accuracy and margin per step (--plot)

Folders are written beside and renamed (common.atomic_dir), so a crash mid-save leaves the previous
checkpoint or model in place. Under FSDP, saving gathers full tensors onto rank 0
(torch.distributed.checkpoint.state_dict, full_state_dict=True), so a checkpoint is the same file
whatever the number of processes, and loading hands each rank its shard again: every rank must
call save_checkpoint, full_state and save_final.
"""
from __future__ import annotations

import copy
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import common


@dataclass
class TrainState:
    """What a checkpoint saves and restores (with the RNG states and the step)."""
    policy: object  # the peft model (LoRA) or the model itself: its trainable weights
    scorer: object  # make_scorers' policy scorer, DDP- or FSDP-wrapped: under FSDP it holds the shards
    optimizer: object
    scheduler: object
    fsdp: bool = False


# ---- which weights train -------------------------------------------------------------------------
def prepare_policy(model, reference, lora_r=0, lora_alpha=16, lora_dropout=0.0, tune_vision=False, tune_projector=False,
                   grad_ckpt=False):
    """-> (policy, frozen reference copy or None). LoRA on every language-model linear layer, or a
    full fine-tune; the vision tower and projector stay frozen unless tune_vision / tune_projector;
    grad_ckpt: activation checkpointing (recompute activations in the backward, less memory)."""
    import torch

    if lora_r > 0 and (tune_vision or tune_projector) and reference == "adapters-disabled":
        raise SystemExit("06_train_dpo: with LoRA the reference is the model with its adapters disabled, which would "
                         "share the vision tower/projector being trained; use --lora-r 0 (a frozen copy) or stored log-probs")
    decoder, vision, projector = model_parts(model)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lm = model.get_submodule(decoder)
        targets = [f"{decoder}.{n}" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
        policy, frozen = get_peft_model(model, cfg), None
    else:
        frozen = None if reference == "stored" else copy.deepcopy(model).eval().requires_grad_(False)
        policy = model
    for names, train in ((vision, tune_vision), (projector, tune_projector)):
        for name in names:
            model.get_submodule(name).requires_grad_(bool(train))
    if grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
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


# ---- processes -----------------------------------------------------------------------------------
def gather(obj, world):
    """All ranks' python objects, rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def make_scorers(model, frozen, forward, fsdp, world):
    """The modules the loop calls: forward(model, batch, ...) inside a module's forward, for the policy
    and for the frozen copy (None without one), so DDP's and FSDP's hooks wrap the whole computation.
    DDP (world > 1) averages the policy's gradients in the backward; FSDP2 shards both, each decoder
    layer one unit and the rest (vision tower, projector, embeddings, head) the root, the scorer
    itself, so that its forward gathers -> (scorer, ref_scorer)."""
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args, **kwargs):
            return forward(self.m, *args, **kwargs)

    def shard(scorer):
        from torch.distributed.fsdp import fully_shard

        for layer in scorer.m.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(scorer)

    scorer, ref_scorer = Scorer(model), None if frozen is None else Scorer(frozen)
    if fsdp:
        return shard(scorer), ref_scorer and shard(ref_scorer)
    if world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(scorer)
    return scorer, ref_scorer


def full_state(state, master, with_optimizer=True, only_trainable=True):
    """-> (trainable [or all] weights by name, optimizer state or None), whole tensors on rank 0
    (None, None elsewhere). Under FSDP every rank must call it: the shards are gathered."""
    if not state.fsdp:
        if not master:
            return None, None
        weights = {n: p.detach().cpu() for n, p in state.policy.named_parameters() if p.requires_grad}
        return weights, state.optimizer.state_dict() if with_optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {"m." + n for n, p in state.policy.named_parameters() if p.requires_grad}  # scorer.m is the model
    weights = {k[2:]: v for k, v in get_model_state_dict(state.scorer, options=opts).items() if k in names or not only_trainable}
    return weights, get_optimizer_state_dict(state.scorer, state.optimizer, options=opts) if with_optimizer else None


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(state, out, step, rank, world, keep=2, meta=None):
    """OUT/checkpoints/step-NNNNNN/trainer_state.pt (see the module docstring) + `meta` (what the
    run was: flags, reference, model fingerprint); keeps the last `keep` (0: all) -> the folder."""
    import numpy as np
    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    rngs = gather(rng, world)
    trainable, optim = full_state(state, rank == 0)
    final = Path(out) / "checkpoints" / f"step-{step:06d}"
    if rank == 0:
        with common.atomic_dir(final) as tmp:
            torch.save({"trainable": trainable, "optimizer": optim, "scheduler": state.scheduler.state_dict(),
                        "fsdp": state.fsdp, "rng": rngs, "step": step, **(meta or {})}, tmp / "trainer_state.pt")
        done = sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return final


def load_checkpoint(state, path, rank, world):
    """Restore a save_checkpoint folder into `state` (weights, optimizer, schedule) and this
    process's RNG states -> the step it was saved at."""
    import numpy as np
    import torch

    if not (Path(path) / "trainer_state.pt").is_file():
        raise SystemExit(f"06_train_dpo: --resume {path}: not a checkpoint folder (no trainer_state.pt)")
    ck = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    missing = set(ck["trainable"]) - {n for n, _ in state.policy.named_parameters()}
    if missing:
        raise SystemExit(f"06_train_dpo: checkpoint {path} holds weights this model lacks, e.g. {sorted(missing)[:3]} "
                         f"(resume with the same --model and LoRA settings)")
    if ck.get("fsdp", False) != state.fsdp:
        raise SystemExit(f"06_train_dpo: checkpoint {path} was written {'with' if ck.get('fsdp') else 'without'} --fsdp; resume the same way")
    if state.fsdp:  # every rank reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(state.scorer, {"m." + n: t for n, t in ck["trainable"].items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(state.scorer, state.optimizer, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            params = dict(state.policy.named_parameters())
            for n, t in ck["trainable"].items():
                params[n].copy_(t)
        state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    rng = ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["step"]


def resume(state, where, out, rank, world):
    """--resume: a checkpoint folder, "auto" (OUT's latest, if any) or None -> (step, folder or None).
    Restores `state` from it, and on rank 0 makes OUT and drops the log lines of steps after it."""
    folder = latest_checkpoint(out) if where == "auto" else where
    step = load_checkpoint(state, folder, rank, world) if folder else 0
    if rank == 0:
        log_path = Path(out) / "log.jsonl"
        Path(out).mkdir(parents=True, exist_ok=True)
        old = [r for _, r in common.read_rows(log_path)] if folder and log_path.is_file() else []
        common.write_jsonl(log_path, [r for r in old if r.get("step", 0) <= step])
    return step, folder


def latest_checkpoint(out):
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


# ---- the trained model ---------------------------------------------------------------------------
def save_final(state, processor, out, master, lora, merge):
    """LoRA: OUT/adapter (peft) and, with `merge`, OUT/final (merged); full fine-tune: OUT/final
    (under FSDP the state dict gathered from every shard; every rank must call this) -> the
    folders written (rank 0; None elsewhere)."""
    weights = full_state(state, master, with_optimizer=False, only_trainable=False)[0] if state.fsdp else None
    if not master:
        return None
    saved, policy, out = [], state.policy, Path(out)
    if lora:
        policy.save_pretrained(out / "adapter")
        processor.save_pretrained(out / "adapter")
        saved.append(str(out / "adapter"))
        if not merge:
            return saved
        policy = policy.merge_and_unload()
    with common.atomic_dir(out / "final") as tmp:
        policy.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
        processor.save_pretrained(tmp)
    return saved + [str(out / "final")]


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
