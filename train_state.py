"""
train_state.py — the weights 06_train_dpo.py trains, kept out of its reading path: which ones
(LoRA adapters or the whole model, vision tower and projector frozen), how they are spread over
processes (DDP, FSDP2), and how they reach the disk so that a run resumes exactly.

  prepare_policy        LoRA (peft) on every language-model linear layer, or a full fine-tune
                        (+ a frozen copy as the reference when no stored log-probs are used)
  make_scorers, gather  DDP averages gradients in the backward; FSDP2 (`fully_shard`) gives each
                        rank a shard of every weight and of the optimizer state
  claim                 OUT belongs to one run: held by one process; another run's folder is refused
                        unless --overwrite or --resume (of a checkpoint with the same settings)
  OUT/checkpoints/step-NNNNNN/trainer_state.pt   trainable weights, optimizer, schedule, every rank's
                        RNG states and the step (the data position follows from it: 06's
                        pair_order is a function of seed and step alone); resume() restores it
                        run.json: the run's id and settings (run_settings), for claim and pruning
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
import vlm


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
        # linear layers that compute what nn.Linear does (LoRA adds to that); Llama 4's MoE router
        # subclasses it and returns a tuple
        targets = [f"{decoder}.{n}" for n, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward]
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


# vqmodel: a VQ image tokenizer, whose discrete codes the LM embeds as tokens (no vision tower)
VISION = ("vision_tower", "visual", "vision_model", "vqmodel")  # what families call the vision encoder ...
PROJECTOR = ("multi_modal_projector", "connector", "embed_vision", "visual.merger", "visual.deepstack_merger_list")


def model_parts(model):
    """-> (decoder name, vision names, projector names) as `model.get_submodule` paths, found by
    search: the decoder holds vlm.decoder_layers; vision / projector are the outermost modules
    whose path ends in a VISION / PROJECTOR name, wherever the family puts them.
    llava: ("model.language_model", ["model.vision_tower"], ["model.multi_modal_projector"]);
    Qwen2.5-VL: (..., ["model.visual"], ["model.visual.merger"]); Idefics3: ("model.text_model", ...);
    Llama 4 (no .model): ("language_model.model", ["vision_model"], ["multi_modal_projector"]).
    A model with no known vision encoder is refused, naming its class."""
    names = dict(model.named_modules())
    layers = vlm.decoder_layers(model)
    decoder = next(n for n, m in names.items() if m is layers).rpartition(".")[0]  # the text model, no LM head

    def outermost(tails):
        hits = [n for t in tails for n in names if n == t or n.endswith(f".{t}")]
        return [h for h in hits if not any(h.startswith(f"{o}.") for o in hits)]

    vision, projector = outermost(VISION), outermost(PROJECTOR)
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


def end_processes(world):
    """The end of a torchrun run: every process leaves the group (nothing to do for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


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

        for layer in vlm.decoder_layers(scorer.m):
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


# ---- whose folder is OUT ---------------------------------------------------------------------------
# What a run is, for its folder: every flag that changes the numbers, the pairs file and the model's
# weights. Flags that only say where, how often or how fast are left out.
NOT_SETTINGS = ("out", "resume", "overwrite", "save_every", "keep_checkpoints", "threads", "plot", "device")


def run_settings(flags, pairs_file, model_fingerprint):
    """-> (run id, settings): a 16-hex-digit hash of what decides this run's numbers, and those
    settings as JSON-able values (stored with every checkpoint, so a refusal can say what differs)."""
    import hashlib
    import json
    import os

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(flags).items()) if k not in NOT_SETTINGS}
    settings["pairs_file"] = [str(pairs_file), os.path.getsize(pairs_file), os.path.getmtime(pairs_file)]
    settings["model_fingerprint"] = model_fingerprint
    settings = json.loads(json.dumps(settings, default=str))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def checkpoints(out):
    """OUT's checkpoint folders, oldest first -> [(folder, its run.json or None)]."""
    return [(p, run_record(p)) for p in sorted((Path(out) / "checkpoints").glob("step-*"))
            if not p.name.endswith(".tmp") and (p / "trainer_state.pt").is_file()]


def run_record(folder):
    """A checkpoint's run.json (run id, settings, step), or None (an older 06 wrote no settings)."""
    import json

    try:
        return json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return None


def differences(old, new):
    """The settings that differ, for a message: "lr 0.0002 -> 0.001, epochs 6 -> 1"."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


def claim(out, resume, overwrite, rank, world):
    """Make OUT this run's, before any work. OUT is held by one process at a time
    (common.hold_output); a folder holding an earlier run (its log, checkpoints, adapter or final
    model) is refused unless --overwrite (which removes them) or --resume continues it (resume()
    then refuses a checkpoint written with other settings). Every process gets rank 0's answer."""
    error = None
    if rank == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        common.hold_output(out)
        previous = [p for p in ("log.jsonl", "final", "adapter", "checkpoints") if (out / p).exists()]
        if overwrite:
            for p in previous + ["log.jsonl.meta.json", "curves.png"]:
                shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
        elif previous and (resume is None or (resume == "auto" and not checkpoints(out))):
            error = (f"{out} holds an earlier run ({', '.join(previous)}): --resume auto continues it (same settings), "
                     "--overwrite replaces it, or choose another --out")
    error = gather(error, world)[0]
    if error:
        raise SystemExit(f"06_train_dpo: {error}")


def resume_from(where, out, run):
    """--resume ("auto": OUT's latest checkpoint; a folder; None) -> the folder to load, or None.
    A checkpoint of other settings is refused, naming the settings that differ."""
    if where is None:
        return None
    found = checkpoints(out)
    if where == "auto" and not found:
        return None
    folder = found[-1][0] if where == "auto" else Path(where)
    if not (folder / "trainer_state.pt").is_file():
        raise SystemExit(f"06_train_dpo: --resume {folder}: not a checkpoint folder (no trainer_state.pt)")
    record = run_record(folder)
    if record is None:
        raise SystemExit(f"06_train_dpo: checkpoint {folder} records no settings (an older 06 wrote it): --overwrite "
                         "starts over")
    if record["run_id"] != run["run_id"]:
        raise SystemExit(f"06_train_dpo: checkpoint {folder} was written with other settings "
                         f"({differences(record['settings'], run['settings'])}); resume with those, or --overwrite "
                         "to start over")
    return folder


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(state, out, step, rank, world, keep=2, meta=None, run=None):
    """OUT/checkpoints/step-NNNNNN/trainer_state.pt (see the module docstring) + `meta` (what the
    run was: flags, reference, model fingerprint) + run.json (`run`: its id and settings, which
    claim() and pruning read); keeps this run's last `keep` (0: all) -> the folder. A write that
    fails (a full disk) ends the run with one line and leaves no partial folder."""
    import json

    import numpy as np
    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    rngs = gather(rng, world)
    trainable, optim = full_state(state, rank == 0)
    final = Path(out) / "checkpoints" / f"step-{step:06d}"
    if rank == 0:
        try:
            with common.atomic_dir(final) as tmp:
                torch.save({"trainable": trainable, "optimizer": optim, "scheduler": state.scheduler.state_dict(),
                            "fsdp": state.fsdp, "rng": rngs, "step": step, **(meta or {})}, tmp / "trainer_state.pt")
                (tmp / "run.json").write_text(json.dumps({**(run or {}), "step": step}))
        except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC as a RuntimeError
            raise SystemExit(f"06_train_dpo: cannot write checkpoint {final}: {str(e).splitlines()[0]} (disk full?)") from None
        mine = [p for p, rec in checkpoints(out) if rec is not None and rec.get("run_id") == (run or {}).get("run_id")]
        for old in mine[:-keep] if keep > 0 else []:  # never another run's
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


def resume(state, where, out, rank, world, run):
    """--resume: restore `state` from resume_from's checkpoint -> (its step, its folder), or (0, None)
    for a fresh start. On rank 0 the log keeps the lines of steps up to it (a line torn by a kill
    mid-write is dropped)."""
    folder = resume_from(where, out, run)
    step = load_checkpoint(state, folder, rank, world) if folder else 0
    if rank == 0:
        log_path = Path(out) / "log.jsonl"
        old = []
        if folder and log_path.is_file():
            data = log_path.read_bytes()
            if not data.endswith(b"\n"):  # the last line was being written when the run died
                log_path.write_bytes(data[: data.rfind(b"\n") + 1])
            old = [r for _, r in common.read_rows(log_path)]
        common.write_jsonl(log_path, [r for r in old if r.get("step", 0) <= step])
    return step, folder


# ---- the run in one line -------------------------------------------------------------------------
def describe(flags, world, pairs, skips, total, optimizer, reference, fingerprint, encode_once, replay, replay_file,
             replay_skips):
    """06's run in one line, printed before the first step; `flags`: the flags as the run uses them."""
    global_batch = flags.batch_size * flags.grad_accum * world
    n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return (f"06_train_dpo: {len(pairs)} pairs ({len(skips)} skipped: {skips.summary()}) | {world} "
            f"process(es) x {flags.batch_size} pairs x {flags.grad_accum} accumulation = {global_batch} per step | "
            f"{total} steps ({len(pairs) // global_batch}/epoch) | {'LoRA r ' + str(flags.lora_r) if flags.lora_r else 'full fine-tune'}, "
            f"{n_trainable / 1e6:.2f}M trainable | reference: {reference} (model "
            f"{fingerprint}) | {'prefix-shared' if flags.prefix_sharing else 'plain'} rows"
            f"{', images encoded once' if encode_once else ''}"
            + (f" | replay: {len(replay)} rows of {replay_file} ({len(replay_skips)} skipped), {flags.replay_batch} "
               f"per micro-step, weight {flags.replay_weight:g}" if replay else ""))


# ---- the trained model ---------------------------------------------------------------------------
def save_final(state, processor, out, master, lora, merge):
    """LoRA: OUT/adapter (peft) and, with `merge`, OUT/final (merged); full fine-tune: OUT/final
    (under FSDP the state dict gathered from every shard; every rank must call this) -> the
    folders written (rank 0; None elsewhere)."""
    weights = full_state(state, master, with_optimizer=False, only_trainable=False)[0] if state.fsdp else None
    if not master:
        return None
    saved, policy, out = [], state.policy, Path(out)
    try:
        if lora:
            with common.atomic_dir(out / "adapter") as tmp:
                policy.save_pretrained(tmp)
                processor.save_pretrained(tmp)
            saved.append(str(out / "adapter"))
            if not merge:
                return saved
            policy = policy.merge_and_unload()
        with common.atomic_dir(out / "final") as tmp:
            policy.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
            processor.save_pretrained(tmp)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"06_train_dpo: cannot write the trained model to {out}: {str(e).splitlines()[0]} "
                         "(disk full?)") from None
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
