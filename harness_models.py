"""
harness_models.py — our model inside VLMEvalKit and lmms-eval: the classes each harness calls, and
the launcher that registers them and runs the harness in the same process. 07_harness.py writes
the commands; you do not run this by hand, but you can:
  python harness_models.py vlmevalkit VLMEvalKit/run.py --config C.json --work-dir W --mode all --judge exact_matching
  python harness_models.py lmms-eval --model mia_hf --model_args pretrained=DIR,device=auto --tasks blink ...
(several GPUs: `python -m torch.distributed.run --nproc-per-node=N harness_models.py vlmevalkit ...`,
`python -m accelerate.commands.launch --num_processes=N harness_models.py lmms-eval ...`).

Our model class (MIADPO_HF in VLMEvalKit, mia_hf in lmms-eval) loads a local checkpoint with
vlm.load_model (AutoModelForImageTextToText + its processor, offline), on the device asked for
(auto: CUDA if there is one), in bfloat16 on a GPU (the checkpoint's dtype on a CPU). It builds every
prompt with vlm.build_inputs, the stages' own prompt builder: the model's chat template with each
image at its place (`place_images`), and decodes greedily, always. Multiple-choice questions get
LLaVA-1.5's wording in VLMEvalKit (common.mc_prompt, as VLMEvalKit's LLaVA class, which the paper
used: options as `A. ...`, then "Answer with the option's letter from the given choices directly.");
lmms-eval tasks keep their own. Differences from VLMEvalKit's LLaVA class: the checkpoint's own chat
template (llava-1.5-hf: no system line), images placed where the text names them (`<image 1>` in
MMMU) instead of all first. A LoRA-only checkpoint is refused (the harnesses load full weights:
06 --merge writes OUT/final).

torchvision: VLMEvalKit imports it at module level in many files, and PyPI's build does not load
beside the CPU torch. The launcher calls vlm.torchvision_or_stand_in before importing a harness: where
torchvision does not import, a stand-in module covers the names used at import time (any call raises,
naming the missing torchvision). There is one fallback, in vlm.py: the stand-in and load_processor's
PIL/video-settings path both follow vlm.torchvision_problem, asked once per process. The stand-in
cannot simply go in favour of load_processor's: the harness's own imports fail before any processor
is loaded. Nor the other way round: 04, 06 and 07_eval.py load processors outside any harness. A
machine with a working torchvision (a GPU user's) gets the real one in both.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import sys
from pathlib import Path

import common
import vlm

MODEL_CLASS = "MIADPO_HF"  # our class's name in vlmeval.vlm
LMMS_MODEL = "mia_hf"  # ... and in lmms-eval's model registry


# ---- prompts: harness messages <-> our LLaVA-format question ---------------------------------------
NUMBERED = re.compile(r"<image\s*(\d+)>")


def place_images(text, n_images):
    """A question text and its image count -> the text with one `<image>` marker per image, each at its
    place: kept where the text already holds exactly n markers; put at `<image k>` where the text names
    images 1..n once each, in order (MMMU); else all first, one line each (LLaVA's order).

    place_images("In Image2, what?", 2) -> "<image>\\n<image>\\nIn Image2, what?"
    place_images("Is <image 1> above <image 2>?", 2) -> "Is <image> above <image>?"
    place_images("Is <image 2> above <image 1>?", 2) -> all first (the images would change order)."""
    if text.count(common.MARKER) == n_images:
        return text
    if common.MARKER in text:
        raise ValueError(f"the text holds {text.count(common.MARKER)} {common.MARKER} markers for {n_images} images")
    if [int(k) for k in NUMBERED.findall(text)] == list(range(1, n_images + 1)):
        return NUMBERED.sub(common.MARKER, text)
    return common.MARKER + "\n" + (common.MARKER + "\n") * (n_images - 1) + text if n_images else text


def question_to_message(question, images):
    """Our question (inline `<image>` markers) + its images -> VLMEvalKit's message list, interleaved
    exactly as the markers stand: "<image>\\nIn Image1, x" -> [image, text "\\nIn Image1, x"]."""
    parts = question.split(common.MARKER)
    if len(parts) - 1 != len(images):
        raise ValueError(f"{len(parts) - 1} markers for {len(images)} images")
    msg = []
    for i, text in enumerate(parts):
        if i:
            msg.append({"type": "image", "value": images[i - 1]})
        if text:
            msg.append({"type": "text", "value": text})
    return msg


def message_to_question(message):
    """VLMEvalKit's message list -> (our question with inline `<image>` markers, image paths). An image
    item becomes a marker at its place; a marker ends its line when text follows directly."""
    question, images = "", []
    for item in message:
        if item["type"] == "image":
            question += ("\n" if question.endswith(common.MARKER) else "") + common.MARKER
            images.append(item["value"])
        elif item["type"] == "text":
            text = item["value"]
            question += ("\n" if question.endswith(common.MARKER) and not text.startswith(("\n", " ")) else "") + text
        else:
            raise ValueError(f"message item of type {item['type']!r}: our class takes images and text only")
    return question, images


def llava_mcq_question(question, options, n_images, hint=None):
    """A multiple-choice row -> our question in LLaVA-1.5's VLMEvalKit wording (common.mc_prompt):
    hint, question, `A. option` lines, "Answer with the option's letter from the given choices directly."."""
    text = f"{hint}\n{question}" if hint else question
    return common.mc_prompt(place_images(text, n_images), n_images, options)


def truncate_at(text, stops):
    """The answer up to the first stop string (lmms-eval's `until`): "B ASSISTANT: x" -> "B "."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


# ---- our model, as both harnesses call it ------------------------------------------------------------
def pick_dtype(dtype, device):
    """"auto" -> bfloat16 on a GPU (the paper's precision), the checkpoint's own dtype on a CPU."""
    return ("bfloat16" if str(device).startswith("cuda") else "auto") if dtype == "auto" else dtype


def full_checkpoint(path):
    """A model directory a harness can load -> its absolute path; SystemExit for a LoRA-only checkpoint
    (06's OUT without --merge, or OUT/adapter itself) or a directory that holds no model."""
    p = Path(path)
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise SystemExit(f"{path}: a LoRA adapter only (adapter_config.json, no config.json). The harnesses load full "
                         f"checkpoints: rerun 06_train_dpo.py with --merge, which writes OUT/final")
    try:
        model_dir, adapter = vlm.resolve_model(path)
    except FileNotFoundError as e:
        raise SystemExit(f"--model {path}: {e}") from None
    if adapter is not None:
        raise SystemExit(f"{path}: a 06 output with a LoRA adapter only ({adapter}), no merged OUT/final. The harnesses "
                         f"load full checkpoints: rerun 06_train_dpo.py with --merge")
    return model_dir.resolve()


class LocalVLM:
    """A local checkpoint answering one question at a time, greedily, as the stages prompt it."""

    def __init__(self, model_path, device="auto", dtype="auto", record=None):
        self.path = full_checkpoint(model_path)
        self.device = vlm.pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model, self.processor = vlm.load_model(self.path, dtype=self.dtype, device=self.device)
        self.fingerprint = vlm.model_fingerprint(self.model)
        if record:  # what was evaluated, for the report
            import transformers

            info = {"path": str(self.path), "fingerprint": self.fingerprint, "device": self.device,
                    "dtype": str(self.model.dtype).replace("torch.", ""), "transformers": transformers.__version__}
            with common.atomic_write(record) as f:
                json.dump(info, f, indent=1)

    def answer(self, question, images, max_new_tokens):
        """Greedy answer to one question with inline `<image>` markers and its PIL images."""
        return vlm.generate(self.model, self.processor, [question], [list(images)], max_new_tokens=max_new_tokens)[0]


def _open_image(path):
    return common.load_image(Path(path).parent, Path(path).name)


class VLMEvalKitModel:
    """Our model for VLMEvalKit; `vlmevalkit_class` mixes in its BaseModel. Config keys: model_path,
    device, dtype, max_new_tokens (2048: as VLMEvalKit's LLaVA class), record (a JSON file to describe
    the loaded model in)."""

    INTERLEAVE = True  # images may stand anywhere in a message
    VIDEO_LLM = False  # video benchmarks hand over frames as images
    is_api = False

    def __init__(self, model_path, device="auto", dtype="auto", max_new_tokens=2048, record=None):
        super().__init__()
        self.vlm = LocalVLM(model_path, device=device, dtype=dtype, record=record)
        self.max_new_tokens = int(max_new_tokens)

    def use_custom_prompt(self, dataset):
        from vlmeval.dataset import DATASET_TYPE

        return DATASET_TYPE(dataset) == "MCQ"  # as VLMEvalKit's LLaVA class

    def build_prompt(self, line, dataset=None):
        import pandas as pd

        paths = self.dump_image(line, dataset)
        paths = paths if isinstance(paths, list) else [paths]
        options = [line[c] for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in line and not pd.isna(line[c])]
        hint = line["hint"] if "hint" in line and not pd.isna(line["hint"]) else None
        return question_to_message(llava_mcq_question(str(line["question"]), options, len(paths), hint), paths)

    def generate_inner(self, message, dataset=None):
        question, paths = message_to_question(message)
        return self.vlm.answer(question, [_open_image(p) for p in paths], self.max_new_tokens)


def vlmevalkit_class():
    """Our VLMEvalKit model class, built on its BaseModel (imported here: VLMEvalKit is optional)."""
    from vlmeval.vlm.base import BaseModel

    return type(MODEL_CLASS, (VLMEvalKitModel, BaseModel), {"__doc__": VLMEvalKitModel.__doc__})


class LmmsEvalModel:
    """Our model for lmms-eval (a "simple" model: text with `<image>` markers + visuals);
    `lmms_eval_class` mixes in its base class. model_args: pretrained, device, dtype,
    max_new_tokens (0: each task's own), record."""

    is_simple = True

    def __init__(self, pretrained, device="auto", dtype="auto", max_new_tokens=0, record=None, batch_size=1):
        super().__init__()
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = vlm.pick_device(device)
        if device == "cuda" and world > 1:  # accelerate launch: one GPU per process
            device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
        self._rank, self._world_size = rank, world
        self.vlm = LocalVLM(pretrained, device=device, dtype=dtype, record=record if rank == 0 else None)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests):
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="07 mia_hf", disable=self._rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
            if any(not hasattr(v, "convert") for v in visuals):
                raise ValueError(f"{task} doc {doc_id}: a visual that is not an image ({type(visuals[0]).__name__}): "
                                 f"this class takes images only (video: use VLMEvalKit's frame sampling)")
            try:
                question = place_images(context, len(visuals))
            except ValueError as e:
                raise ValueError(f"{task} doc {doc_id}: {e}") from None
            n = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or 1024)
            text = self.vlm.answer(question, [v.convert("RGB") for v in visuals], n)
            until = gen_kwargs.get("until") or []
            out.append(truncate_at(text, [until] if isinstance(until, str) else until))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("mia_hf answers generate_until tasks only (every benchmark 07 runs is one)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("mia_hf answers single-round generate_until tasks only")


def _flatten(visuals):
    """lmms-eval's visuals, nested or not -> a flat list."""
    out = []
    for v in visuals or []:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def lmms_eval_class():
    """Our lmms-eval model class, built on its `lmms` base (imported here: lmms-eval is optional)."""
    from lmms_eval.api.model import lmms

    return type("MiaHf", (LmmsEvalModel, lmms), {"__doc__": LmmsEvalModel.__doc__})


# ---- the launcher: runs inside the harness's process ---------------------------------------------------
def _no_download(url, *a, **k):
    raise RuntimeError(f"VLMEvalKit tried to download {url}: the benchmark file is missing or its MD5 differs from "
                       f"VLMEvalKit's built-in one. Place the exact file under $LMUData, run your own file as "
                       f"custom:NAME, or pass --allow-download")


def launch(argv):
    """`vlmevalkit RUN_PY ARGS...` | `lmms-eval ARGS...`: register our class with the harness, then run
    its own entry point in this process with ARGS."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # VLMEvalKit's litellm reads it at import
    tv = vlm.torchvision_or_stand_in()  # before any harness import: VLMEvalKit imports torchvision at module level
    print(f"07_harness launcher: torchvision {tv if tv == 'real' else 'stand-in (' + tv[:120] + ')'}", flush=True)
    which = argv[0]
    if which == "vlmevalkit":
        run_py, rest = argv[1], argv[2:]
        sys.path.insert(0, str(Path(run_py).parent))  # a clone that is not pip-installed
        import vlmeval.config  # noqa: F401 — imports vlmeval.vlm and vlmeval.api
        import vlmeval.dataset  # noqa: F401
        import vlmeval.inference  # noqa: F401
        import vlmeval.vlm

        setattr(vlmeval.vlm, MODEL_CLASS, vlmevalkit_class())  # run.py looks config classes up here
        if os.environ.get("MIA_NO_DOWNLOAD"):
            for mod in [m for k, m in list(sys.modules.items()) if k.startswith("vlmeval") and m is not None]:
                if callable(getattr(mod, "download_file", None)):
                    mod.download_file = _no_download
        sys.argv = [run_py] + rest
        runpy.run_path(run_py, run_name="__main__")
    elif which == "lmms-eval":
        from lmms_eval.models import MODEL_REGISTRY_V2
        from lmms_eval.models.registry_v2 import ModelManifest

        sys.modules["__main__"].MiaHf = lmms_eval_class()  # importable as __main__.MiaHf
        MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=LMMS_MODEL, simple_class_path="__main__.MiaHf"),
                                            overwrite=True)
        from lmms_eval.__main__ import cli_evaluate

        sys.argv = ["lmms-eval"] + argv[1:]
        cli_evaluate()
    else:
        raise SystemExit(f"harness_models.py: vlmevalkit or lmms-eval, not {which!r}")


if __name__ == "__main__":
    launch(sys.argv[1:])
