"""
vlm.py — talking to a vision-language model: load it, prompt it, score and generate with it.

  model  : load_model / load_processor (a LOCAL Hugging Face checkpoint, never a download),
           check_supported (refuses an encoder-decoder, a model without an image token, or a
           processor that places images itself), image_token_id, model_fingerprint,
           cap_image_tokens / image_settings_id (the visual-token budget and its record),
           resolve_model (a model or LoRA adapter folder), parse_models (--model NAME=PATH, 07's flag)
  torchvision: torchvision_problem (does it import here? the one answer, asked once per process),
           torchvision_or_stand_in (a stand-in for code that imports it at module level: the harnesses)
  prompts: image_placeholder / render_prompt / render_pair (the family's own chat template: its
           image item in place of each <image>, the answer turn up to its end-of-turn token),
           build_inputs (questions [+ answers] + images -> padded batch with labels)
  tensors: image_spans / image_positions, response_logps + logps_at / next_token_logprobs (LM head
           only where needed), pair_logps, generate (greedy)

The same build_inputs serves generation (04, 07) and training (06), so the prompt a model is
trained on can never differ from the prompt it answered — the released code had that bug.
torch and transformers are imported inside the functions that need them.

Without a torchvision that imports (PyPI's torchvision is a CUDA build that fails beside a CPU
torch), two things need a fallback: transformers' processors (load_processor: PIL image processors,
a video part as its saved settings, a class gated on torchvision imported past it) and harness code
that imports torchvision at module level (VLMEvalKit: torchvision_or_stand_in). Both ask
torchvision_problem, so they never disagree.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
from pathlib import Path

from common import MARKER


IGNORE_INDEX = -100
# LLaVA-1.5's conversation format, used only when a processor carries no chat template.
FALLBACK_TEMPLATE = "USER: {question} ASSISTANT:"
# ---------------------------------------------------------------------------------------------
# model and processor
# ---------------------------------------------------------------------------------------------
DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device):
    """--device: "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(path):
    """A --model path -> (model dir, adapter dir or None): a model directory as it is; 06's OUT:
    OUT/final (merged or full) if there, else OUT/adapter on the base model its adapter_config names."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p, None
    if (p / "final" / "config.json").is_file():
        return p / "final", None
    cfg = p / "adapter" / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text())["base_model_name_or_path"]
        return Path(base), p / "adapter"
    raise FileNotFoundError(f"{path}: no config.json, final/ or adapter/ here: not a model directory or a 06 output")


TOY_MODELS = ("base=models/toy-llava", "dpo=out/dpo-toy")  # no --model: the toy demo's base and its 06 output


def parse_models(specs):
    """--model NAME=PATH flags (07_eval.py and 07_harness.py) -> {name: path}, in the order given
    (none given: TOY_MODELS); SystemExit for a flag that is not NAME=PATH or a name given twice."""
    out = {}
    for s in specs or TOY_MODELS:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model {s!r}: expected NAME=PATH (e.g. base=models/toy-llava)")
        if name in out:
            raise SystemExit(f"--model: the name {name!r} is given twice")
        out[name] = path
    return out


def load_model(path, dtype="auto", device="cpu", attn_implementation=None, adapter=None, max_image_tokens=None):
    """Load an image-text-to-text checkpoint and its processor from a LOCAL directory.

    Never downloads: `path` must be a directory holding `config.json` (as `save_pretrained` or
    `huggingface-cli download` leave it). `dtype`: one of DTYPES ("auto" = the checkpoint's).
    `attn_implementation`: "eager", "sdpa", "flash_attention_2" or None (transformers' default).
    `adapter`: a LoRA adapter directory (06's OUT/adapter), merged into the weights on load.
    `max_image_tokens`: cap_image_tokens(processor, N), the same cap for 04, 06 and 07 (--max-image-tokens).
    A checkpoint check_supported refuses ends the run there, in one line.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a local model directory (no config.json). This toolkit never downloads "
            f"weights; fetch the checkpoint yourself, or run 00_make_toy.py and 00_train_toy.py for the toy model."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    kw = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "local_files_only": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device).eval()
    processor = load_processor(path)
    check_supported(model, processor)
    if max_image_tokens:
        try:
            cap_image_tokens(processor, max_image_tokens)
        except ValueError as e:  # a cap the processor cannot meet, or that would bound nothing: one line
            raise SystemExit(f"--max-image-tokens {max_image_tokens}: {e}") from None
    return model, processor


def check_supported(model, processor):
    """Refuse, in one line (SystemExit), a checkpoint this toolkit cannot prompt or score as it does
    every family: the answer as the continuation of the prompt in ONE decoder sequence (response_logps,
    DPO's log-probs), each image where the question puts its <image> (sequences of several images).
      an encoder-decoder (Florence-2: a BART encoder reads image + prompt, its decoder writes the answer);
      a processor that places the image itself, wherever the prompt's image token is (BLIP-2: in front
      of the text; Fuyu, Florence-2: refuse a prompt that holds one) — checked on a 64-px image, with
      the placeholder first and last: its image tokens must move with it;
      a model whose config names no image token (Kosmos-2: the processor writes the image in front of
      the text and a position mask says where its embeddings go): nothing in a prompt marks an image."""
    from PIL import Image

    name = type(model).__name__
    if model.config.is_encoder_decoder:
        raise SystemExit(f"{name} is an encoder-decoder model: this toolkit scores and trains an answer as the "
                         f"continuation of its prompt in one decoder-only sequence")
    try:
        token = image_token_id(model)
    except ValueError as e:  # every stage locates images by this id: refuse here, in one line, not mid-run
        raise SystemExit(f"{name}: {e}, so no token of a prompt marks where an image goes: this toolkit writes "
                         f"each image at the model's image token, where the question puts it") from None
    ph = image_placeholder(processor)
    try:  # return_tensors: Ovis2's expansion needs tensors
        ids = [processor(text=[t], images=[[Image.new("RGB", (64, 64))]], return_tensors="pt")["input_ids"][0].tolist()
               for t in (ph + "\nQ", "Q\n" + ph)]
    except ValueError as e:
        raise SystemExit(f"{name}: its processor refuses an image at its image token {ph!r}, where this toolkit "
                         f"writes each image: {str(e).splitlines()[0]}") from None
    first = [row.index(token) if token in row else -1 for row in ids]
    if first[1] <= first[0]:
        raise SystemExit(f"{name}: its processor puts the image's tokens at the same place wherever the prompt's image "
                         f"token {ph!r} is (in front of the text): it places images itself, so a prompt cannot place "
                         f"one, or several, where the question puts them")


def load_processor(path):
    """The processor of a LOCAL checkpoint: `AutoProcessor.from_pretrained(path)`, also where
    torchvision cannot be imported.

    On a machine where torchvision imports (a GPU user's), this IS AutoProcessor. Where it does not
    (PyPI's torchvision is a CUDA build that fails beside a CPU torch), transformers 5.23 falls short
    for two kinds of processor, which are then built from the same files, as the same class, with
    the PIL image processor, exactly as AutoProcessor builds them otherwise:
    - a processor holding a video processor (Qwen2/2.5/3-VL, Qwen3.5, LLaVA-OneVision, InternVL,
      SmolVLM, Gemma 4): every video processor needs torchvision, so the video part is its saved
      settings only (a dict, readable as attributes: SmolVLM's apply_chat_template reads
      `.num_frames`; save_pretrained writes it back), and a call with videos raises;
    - a processor class transformers gates on torchvision alone (`@requires(backends=("torchvision",
      "torch"))`, so its lazy module hands out a dummy) while its image processor has a PIL class:
      PixtralProcessor (Mistral 3), whose module imports a pure-Python size helper from the
      torchvision image processor's module. The real class is imported past that (_torchvision_stand_in).
    Token ids equal AutoProcessor's; pixel values are the PIL image processor's, which PIL's and
    torchvision's resizes can put a uint8 level apart (tests/test_families.py compares the two where
    torchvision imports). A processor whose image processor has no PIL class (Llama 4's,
    LFM2-VL's) is refused in one line that names torchvision. Other processors load through
    AutoProcessor either way (it then picks the PIL image processor).
      load_processor("models/qwen2-vl")  ->  Qwen2VLProcessor (.video_processor: settings only here)
    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.utils import is_torchvision_available

    path = Path(path)

    def processor_class():  # where AutoProcessor looks for it, in the same order
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            if found := _read_json(path, name).get("processor_class"):
                return processor_class_from_name(found)
        name = PROCESSOR_MAPPING_NAMES.get(_read_json(path, "config.json").get("model_type"))
        return processor_class_from_name(name) if name else None

    works = torchvision_problem() is None
    broken = is_torchvision_available() and not works  # installed, yet transformers' torchvision paths fail
    cls = processor_class()
    # a dummy's _backends are the ones missing here: torchvision alone -> the real class can be had
    gated = not works and getattr(cls, "is_dummy", False) and list(cls._backends) == ["torchvision"]
    try:
        if gated:
            cls = _ungated_class(cls.__name__)
        if works or cls is None or not (broken or gated or "video_processor" in cls.get_attributes()):
            return AutoProcessor.from_pretrained(path, local_files_only=True)
        return _processor_from_parts(cls, path)
    except (ImportError, ValueError) as e:  # Llama 4's and LFM2-VL's image processors: torchvision classes only
        if works or "torchvision" not in str(e).lower():
            raise
        raise ValueError(f"{path}: {getattr(cls, '__name__', 'its processor')} needs torchvision, which does not import "
                         f"here ({torchvision_problem()}): transformers requires torchvision for its processing. "
                         f"It runs where torchvision imports (every GPU machine; tests: bash run.sh test-gpu-lane)") from None


def _read_json(folder, name):
    f = folder / name
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _ungated_class(name):
    """The real transformers class `name` where its lazy module hands out a dummy because torchvision
    is missing: imported from the module transformers' own table names, past its torchvision imports."""
    import transformers

    with _torchvision_stand_in():  # _class_to_module: the lazy module's name -> defining module table
        module = importlib.import_module(f"transformers.{transformers._class_to_module[name]}")
    return getattr(module, name)


def _processor_from_parts(cls, path):
    """A `cls` processor without torchvision: each part loaded the way AutoProcessor loads it, the
    image processor as its PIL class, a video part as its saved settings (load_processor)."""
    import inspect

    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    class VideoSettings(dict):
        """The video processor's saved settings, standing in for it; processing a video raises."""
        _auto_class, model_input_names = None, []  # what ProcessorMixin reads of every part

        def __getattr__(self, name):  # settings as attributes; unset ones None, like the class defaults
            if name.startswith("_"):
                raise AttributeError(name)
            return self.get(name)

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{path}: {cls.__name__} cannot process videos on this machine: its video "
                               f"processor needs torchvision, which does not import here")

    settings, _ = cls.get_processor_dict(path, local_files_only=True)  # processor_config.json + chat template
    parts = []
    for attr in cls.get_attributes():
        if attr == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path, local_files_only=True))
        elif attr == "image_processor":
            ip = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
            # a class with no PIL twin: transformers raises where torchvision is not installed, and
            # falls back to the torchvision class where it is installed but broken
            if getattr(ip, "backend", None) == "torchvision":
                raise ValueError(f"{path}: {type(ip).__name__} is a torchvision class, with no PIL twin")
            parts.append(ip)
        elif attr in ("feature_extractor", "audio_processor"):
            parts.append(AutoFeatureExtractor.from_pretrained(path, local_files_only=True))
        elif attr == "video_processor":
            parts.append(VideoSettings(settings.get(attr) or _read_json(path, "video_preprocessor_config.json")))
        else:
            raise ValueError(f"{path}: {cls.__name__} needs a {attr}, which cannot be loaded without torchvision")
    accepted = {p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in cls.get_attributes()}
    processor = cls.__new__(cls)
    # subtle: ProcessorMixin.__init__ type-checks every part, the video one against VideoProcessorMixin,
    # which transformers does not define without torchvision. For this one call, the settings pass.
    real_check = cls.check_argument_for_proper_class
    processor.check_argument_for_proper_class = (
        lambda attr, arg: None if isinstance(arg, VideoSettings) else real_check(processor, attr, arg))
    processor.__init__(*parts, **{k: v for k, v in settings.items() if k in accepted})
    del processor.check_argument_for_proper_class
    return processor


# ---------------------------------------------------------------------------------------------
# torchvision: one answer to "does it import here?", and a stand-in for module-level imports
# ---------------------------------------------------------------------------------------------
_TORCHVISION = {}  # torchvision_problem's answer, once per process


def torchvision_problem():
    """None when torchvision imports here; else why not ("ModuleNotFoundError: No module named
    'torchvision'", or the error of a build that does not match torch). It imports the submodule
    transformers' torchvision paths use: a mismatched build installs fine and fails here.

    Asked once per process and remembered: after torchvision_or_stand_in has put its stand-in in
    place the import would succeed, and load_processor must still hear "no"."""
    if "problem" not in _TORCHVISION:
        try:
            import torchvision.transforms.v2.functional  # noqa: F401

            _TORCHVISION["problem"] = None
        except Exception as e:  # noqa: BLE001 — PyPI's CUDA build beside the CPU torch raises RuntimeError, OSError...
            _TORCHVISION["problem"] = f"{type(e).__name__}: {e}"
    return _TORCHVISION["problem"]


class _Absent:
    """Stands in for a torchvision name: attributes chain, hashing works (defaults, dict keys at import
    time), any call raises naming what is missing."""

    def __init__(self, path):
        self._path = path

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self._path}.{name}")

    def __call__(self, *a, **k):
        raise ModuleNotFoundError(f"{self._path}: torchvision is not importable here (vlm's stand-in covers its "
                                  f"import-time names only); this needs a working torchvision")

    def __mro_entries__(self, bases):  # `class X(torchvision.Y)` at import time: defined, fails when used
        return (object,)

    def __repr__(self):
        return f"<absent {self._path}>"


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder that answers every `torchvision[.x]` import with a module of _Absent names."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        mod = type("StandIn", (types.ModuleType,), {"__getattr__": lambda self, n: _absent_attr(self, n)})(spec.name)
        mod.__path__, mod.__version__ = [], "0.0+absent"
        return mod

    def exec_module(self, module):
        pass


def _absent_attr(module, name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Absent(f"{module.__name__}.{name}")


def torchvision_or_stand_in():
    """For a process that runs code importing torchvision at module level (VLMEvalKit does, in many
    files): the real torchvision if it imports (torchvision_problem); else a stand-in that covers
    only names used at import time (any call raises, naming the missing torchvision), installed after
    transformers and datasets have recorded that torchvision is absent, so they keep their PIL image
    processors and load_processor still takes its no-torchvision path. -> "real" | the reason."""
    reason = torchvision_problem()
    if reason is None:
        return "real"
    if not any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
        _record_torchvision_absent()
        sys.meta_path.insert(0, _TorchvisionStandIn())
    return reason


@contextlib.contextmanager
def _torchvision_stand_in():
    """torchvision_or_stand_in for the imports inside the block only (load_processor: PixtralProcessor's
    module imports a helper from the torchvision image processor's module); afterwards `import
    torchvision` fails again, and only what the block imported keeps stand-in names."""
    if any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):  # the process-wide one is in place
        yield
        return
    _record_torchvision_absent()
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision_modules()


def _record_torchvision_absent():
    """Make transformers and datasets record now that torchvision is absent (both cache the answer),
    so that no stand-in installed after this can make them think it is there."""
    _drop_torchvision_modules()
    sys.modules["torchvision"] = None  # importlib.util.find_spec -> None while they look
    try:
        import transformers.utils.import_utils as iu

        iu.is_torchvision_available(), iu.is_torchvision_v2_available()  # both are cached from here on
        try:
            import datasets.config  # noqa: F401 — its TORCHVISION_AVAILABLE is read at import
        except ImportError:
            pass
    finally:
        del sys.modules["torchvision"]


def _drop_torchvision_modules():
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]


def cap_image_tokens(processor, n):
    """Set the processor's own resolution setting so that no image becomes more than `n` visual
    tokens -> {setting: new value}. The knob is the family's: Qwen's max_pixels (size.longest_edge),
    InternVL's max_patches, Idefics3 / SmolVLM's tile size (size.longest_edge), LLaVA-NeXT /
    OneVision's image_grid_pinpoints (those whose tiles fit), Gemma 4's max_soft_tokens. Families
    with a fixed count (LLaVA-1.5 576, Gemma 3 256) are left as they are when it fits. Checked on
    large probe images of three shapes: a cap the processor cannot meet raises, naming it.
      cap_image_tokens(qwen2_5_vl_processor, 1024)  ->  {"size.longest_edge": 802816}  (1024 x 28 x 28)
    """
    from PIL import Image

    ip, name, set_ = processor.image_processor, type(processor).__name__, {}
    size = dict(getattr(ip, "size", None) or {})
    before = {"size.longest_edge": size.get("longest_edge"), "max_soft_tokens": getattr(ip, "max_soft_tokens", None),
              "max_patches": getattr(ip, "max_patches", None),
              "image_grid_pinpoints": getattr(ip, "image_grid_pinpoints", None)}

    def emitted(w, h):
        return emitted_image_tokens(processor, [Image.new("RGB", (w, h))])[0]

    if hasattr(ip, "max_image_tiles"):  # Llama 3.2 Vision: one text token per image, up to 4 tiles of features
        raise ValueError(f"{name}: its images reach the text through cross-attention, one token each, so a cap on "
                         f"visual tokens does not bound their features; set its image processor's max_image_tiles "
                         f"({ip.max_image_tiles}) instead")
    if hasattr(ip, "merge_size") and "longest_edge" in size:  # Qwen2/2.5/3-VL, Qwen3.5: area in pixels
        unit = (ip.patch_size * ip.merge_size) ** 2
        size["longest_edge"] = max(n * unit, size.get("shortest_edge", 0))
        set_["size.longest_edge"] = size["longest_edge"]
        ip.size = size
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = size["longest_edge"]
    elif hasattr(ip, "max_soft_tokens"):  # Gemma 4
        allowed = [t for t in (70, 140, 280, 560, 1120) if t <= n]
        if not allowed:
            raise ValueError(f"{name}: at least 70 visual tokens per image; cannot cap at {n}")
        ip.max_soft_tokens = set_["max_soft_tokens"] = allowed[-1]
    elif hasattr(ip, "max_patches"):  # InternVL: tiles of `size`, plus a thumbnail when tiled
        per_tile = emitted(size["width"], size["height"])
        ip.max_patches = set_["max_patches"] = max(1, n // per_tile - 1)
    elif getattr(ip, "do_image_splitting", False) and hasattr(ip, "max_image_size"):  # Idefics3 / SmolVLM: tiles + a global view
        tile = ip.max_image_size["longest_edge"]
        per_tile = emitted(tile, tile)
        k = int(math.isqrt(max(0, n // per_tile - 1)))  # k x k tiles + the global view
        size["longest_edge"] = max(tile, k * tile)
        ip.size = size
        set_["size.longest_edge"] = size["longest_edge"]
    elif getattr(ip, "image_grid_pinpoints", None):  # LLaVA-NeXT / OneVision: the grids whose tokens fit
        fits = [pp for pp in ip.image_grid_pinpoints if emitted(pp[1], pp[0]) <= n]
        if not fits:
            raise ValueError(f"{name}: even its smallest anyres grid gives more than {n} visual tokens")
        ip.image_grid_pinpoints = set_["image_grid_pinpoints"] = fits
        if hasattr(processor, "image_grid_pinpoints"):
            processor.image_grid_pinpoints = fits
    set_ = {k: v for k, v in set_.items() if v != before.get(k)}  # what really changed
    for w, h in ((4000, 3000), (3000, 4000), (4000, 4000)):
        got = emitted(w, h)
        if got > n:
            raise ValueError(f"{name}: a {w}x{h} image still gives {got} visual tokens, more than the cap {n}"
                             + ("" if set_ else " (its count is fixed)"))
    return set_


def image_settings_id(processor):
    """A short hash of every image-processing setting (resolution caps included): stored with the
    reference log-probs (04) so that 06 can refuse ones computed with other image settings, which
    the weights' fingerprint cannot see."""
    d = processor.image_processor.to_dict()
    extra = {k: getattr(processor, k, None) for k in ("image_grid_pinpoints", "num_image_tokens", "image_seq_len")}
    text = json.dumps({"image_processor": d, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dtype_name(model):
    """The loaded weights' dtype as --dtype names it: "float32", "bfloat16", "float16"."""
    return str(model.dtype).removeprefix("torch.")


def model_fingerprint(model):
    """A short hash of a model's weights, cheap even at 7B: name, shape, dtype and the first and
    last 256 values of every tensor. Stored with reference log-probs (04) so that a trainer (06)
    can refuse log-probs that another model computed."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def decoder_layers(model):
    """The language model's decoder layers (a ModuleList), found by search: the first `*layers`
    ModuleList under model.get_decoder() (llava: model.language_model.layers; Idefics3: .text_model;
    Llama 4, whose get_decoder() is a causal-LM wrapper: .language_model.model.layers). Vision
    towers sit outside the decoder, so their layers are never taken."""
    import torch

    root = model.get_decoder()
    for name, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1].endswith("layers") and len(module):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder layers under {type(root).__name__} (get_decoder())")


def image_token_id(model_or_config):
    """The id that marks visual-token positions in input_ids (`image_token_id` in transformers 5)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in ("image_token_id", "image_token_index"):
        if getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    raise ValueError("model config names no image token (image_token_id / image_token_index)")


def _image_token_text(processor):
    """The processor's image token as text, or None: Blip2Processor holds it as a tokenizers
    AddedToken (whose str() is its text), the others as a str."""
    token = getattr(processor, "image_token", None)
    return None if token is None else str(token)


def emitted_image_tokens(processor, images, token_id=None):
    """Image-token positions `processor(text=..., images=images)` gives each image (one prompt).
    token_id: the one the model fills (image_token_id(model)); without it, the tokenizer's image
    token or the processor's. subtle: the processor's may be a wrapper: Gemma 3's is
    <start_of_image>, Llama 4's <|image|> (once per image) while the model fills <|patch|>."""
    tok = processor.tokenizer
    if token_id is None:
        soft = getattr(tok, "image_token", None)
        token_id = tok.convert_tokens_to_ids(soft) if soft else processor.image_token_id
    def ids(ims, **kw):  # return_tensors: Ovis2's expansion needs tensors
        return processor(text=[_image_token_text(processor) * len(ims)], images=[ims], return_tensors="pt", **kw)

    enc = ids(images, return_text_replacement_offsets=True)
    if "text_replacement_offsets" in enc:
        counts = [tok(span["replacement"], add_special_tokens=False)["input_ids"].count(token_id)
                  for span in enc["text_replacement_offsets"][0]]
    else:  # a processor with its own __call__ (Idefics2, Mllama) drops the option: each image alone, checked below
        counts = [ids([im])["input_ids"][0].tolist().count(token_id) for im in images]
    if sum(counts) != enc["input_ids"][0].tolist().count(token_id):
        raise ValueError(f"{type(processor).__name__}: image tokens outside the images' replacements "
                         f"(or an image expands otherwise beside others)")
    return counts


# ---------------------------------------------------------------------------------------------
# prompts: the model's own chat template, with every <image> kept where the question puts it
# ---------------------------------------------------------------------------------------------
# Passed to every chat template (a template that does not read a variable ignores it): thinking
# models (Qwen3.5, Gemma 4) are aligned and evaluated in their non-thinking mode, where the
# answer follows the generation prompt directly.
TEMPLATE_KWARGS = {"enable_thinking": False}
_PLACEHOLDERS = {}  # (id(processor), template) -> image placeholder text
_SPECIALS = {}  # (id(tokenizer), its size) -> special-token strings


_RENDERED = {}  # (id(processor), template, messages, options) -> the rendered text


def _chat(processor, messages, **kw):
    """The chat template rendered, remembered per processor, template and messages: 04 renders each
    question's prompt and conversation several times a row (generation, the tokens it scores, the
    pair's reference and fingerprint), and one rendering (~0.2 ms) weighed as much as a decode step
    of the toy. A template that writes the date keeps the first one for the process."""
    # subtle: transformers treats a variable the template does not read as a processor argument (and warns)
    template = processor.chat_template
    key = (id(processor), template, repr(messages), repr(sorted(kw.items())))
    if key not in _RENDERED:
        if len(_RENDERED) > 100_000:  # a bound for long runs: start over
            _RENDERED.clear()
        extra = {k: v for k, v in TEMPLATE_KWARGS.items() if isinstance(template, str) and k in template}
        _RENDERED[key] = processor.apply_chat_template(messages, tokenize=False, **extra, **kw)
    return _RENDERED[key]


def image_placeholder(processor):
    """What the family's chat template writes for ONE image item, wrappers included, outer white
    space stripped: the difference between a user message with one and with two leading images.
      llava-1.5: "<image>"   Qwen2.5-VL: "<|vision_start|><|image_pad|><|vision_end|>"
      InternVL: "<IMG_CONTEXT>"   Gemma 3: "<start_of_image>"   (the processor expands each one)
    Without a chat template: the processor's image token. A template whose image item does not
    contain the processor's image token is refused (nothing would mark the image)."""
    token = _image_token_text(processor) or MARKER
    template = getattr(processor, "chat_template", None)
    if not template:
        return token
    key = (id(processor), template)
    if key not in _PLACEHOLDERS:
        def render(content):
            return _chat(processor, [{"role": "user", "content": content}], add_generation_prompt=True)

        # one image vs two: a template that branches on whether a message has images at all (Llama 3.2 Vision
        # writes a dated system turn without) differs by one image item only
        a, b = (render([{"type": "image"}] * k + [{"type": "text", "text": "Q"}]) for k in (1, 2))
        pre = len(os.path.commonprefix([a, b]))
        post = len(os.path.commonprefix([a[pre:][::-1], b[pre:][::-1]]))
        found = b[pre:len(b) - post].strip()
        if token not in found:
            raise ValueError(f"{type(processor).__name__}: its chat template renders an image item as {found!r}, "
                             f"which lacks the processor's image token {token!r}")
        _PLACEHOLDERS[key] = found
    return _PLACEHOLDERS[key]


def render_prompt(processor, question):
    """LLaVA-format question (with inline `<image>` markers) -> the model's generation prompt.

    Each `<image>` becomes the template's image item, in place (user_content), e.g. for
    llava-1.5-7b-hf: `USER: Image1:<image>\nIn Image1, what ...? ASSISTANT:`; for Qwen2.5-VL:
    `...<|im_start|>user\nImage1:<|vision_start|><|image_pad|><|vision_end|>\nIn Image1, ...`.
    """
    if not getattr(processor, "chat_template", None):
        return FALLBACK_TEMPLATE.format(question=question.replace(MARKER, image_placeholder(processor)))
    msgs = [{"role": "user", "content": user_content(processor, question)}]
    return _chat(processor, msgs, add_generation_prompt=True)


def user_content(processor, question):
    """The user message's content items for a question, each `<image>` the template's image item in place.
    Interleaved items (text, image, text, ...) where the template renders them in that order, so that
    it also knows the message holds images (Llama 3.2 Vision writes a dated system turn only for a
    message without); else ONE text item with image_placeholder inline. subtle: llava-hf templates
    render a message's image items first and its text after, which would pull every image away from
    its `ImageK:` label: for them the text item, whose rendering differs only in that order."""
    inline = [{"type": "text", "text": question.replace(MARKER, image_placeholder(processor))}]
    items = []
    for k, text in enumerate(question.split(MARKER)):
        items += ([{"type": "image"}] if k else []) + ([{"type": "text", "text": text}] if text else [])
    if items == inline:  # no image
        return inline
    shown = _chat(processor, [{"role": "user", "content": items}], add_generation_prompt=True)
    return items if inline[0]["text"] in shown else inline


def special_tokens(tokenizer):
    """The tokenizer's special-token strings (EOS, end-of-turn markers, ...), computed once per
    tokenizer: render_pair and with_stop ask for every row (Gemma's tokenizers have thousands)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _SPECIALS:
        found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        _SPECIALS[key] = frozenset(found | set(tokenizer.all_special_tokens))
    return _SPECIALS[key]


def render_pair(processor, question, answer, prompt=None):
    """-> (prompt_text, response_text): the generation prompt, and what the model must generate
    after it for this answer, as the template writes the answer turn.

    The answer turn is found in the full conversation (rendered with a stand-in answer), not by
    assuming the generation prompt is a prefix of it: LLaVA-OneVision's template opens a rendered
    answer turn with `assistant \\n` but prompts with `assistant\\n`; Gemma 4's prompt ends with an
    empty thought channel a rendered turn lacks. The response is the answer, preceded by what the
    conversation puts between the prompt and the answer when the prompt IS its prefix (llava-1.5:
    " "), and followed by the template's text up to and including its EOS token if it writes one
    (Aya Vision: `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`), else its first special token (the
    end-of-turn token generation stops at: `<|im_end|>`, `<end_of_turn>`, `</s>`), or where the
    turn has none, the one that opens the next turn (GLM-4.1V: `<|user|>`, in its generation
    config's stop ids). A template with neither (llava-1.5) gives the bare answer; build_inputs
    then appends EOS. Every family's scored response ends in a token generation stops at (tested).
      llava-1.5 : ("USER: <image>\\nQ ASSISTANT:", " blue")
      Qwen2.5-VL: ("...<|im_start|>assistant\\n", "blue<|im_end|>")
    No chat template: (FALLBACK_TEMPLATE's prompt, " blue"), or "blue" where the processor itself ends
    the prompt with white space (PaliGemma: "\\n", after which its prefix-LM generates the answer).
    `prompt`: render_prompt(processor, question), where the caller has it already.
    """
    prompt = render_prompt(processor, question) if prompt is None else prompt
    answer = answer.strip()
    if not getattr(processor, "chat_template", None):  # FALLBACK_TEMPLATE: " " before the answer, unless the
        gap = "" if processor_text(processor, prompt)[-1:].isspace() else " "  # processor ends it so (PaliGemma: "\n")
        return prompt, gap + answer
    stand_in = "\u2063MIA-DPO-ANSWER\u2063"  # text no template rewrites (and a repr() escapes)
    user = {"role": "user", "content": user_content(processor, question)}
    for content in ([{"type": "text", "text": stand_in}], stand_in):  # items; or a string (GLM-4.1V prints items' repr)
        full = _chat(processor, [user, {"role": "assistant", "content": content}])
        if full.count(stand_in) == 1:
            break
    else:
        raise ValueError(f"{type(processor).__name__}: its chat template does not write the answer turn's text once")
    head, tail = full.split(stand_in)
    user_turn = prompt[: len(os.path.commonprefix([prompt, head]))]
    if question.split(MARKER)[-1].strip() not in user_turn:
        raise ValueError(f"{type(processor).__name__}: its chat template renders the question differently "
                         f"in a prompt and in a conversation")
    gap = head[len(prompt):] if head.startswith(prompt) else ""
    gap = gap if answer or gap.strip() else ""  # an empty answer: the model stopped at once (llava's " " is not said)
    eos = processor.tokenizer.eos_token  # Aya Vision: <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, generation stops at the EOS
    ends = tail.index(eos) + len(eos) if eos and eos in tail else _first_special(processor, tail)
    if ends is None:  # no end token after the answer: the one that opens the next turn, if any (GLM-4.1V: <|user|>)
        tail, ends = _next_turn_opening(processor, content, stand_in) or tail.rstrip(), None
    return prompt, gap + answer + (tail[:ends] if ends else tail)


_OPENINGS = {}  # (id(processor), template) -> the text through the next turn's first special token, or ""


def _next_turn_opening(processor, content, stand_in):
    """What a template writes after an answer up to and including the special token that opens the
    next turn ("\n<|user|>" for GLM-4.1V), "" if none: rendered once per template (one user turn "Q")."""
    key = (id(processor), processor.chat_template)
    if key not in _OPENINGS:
        user = {"role": "user", "content": [{"type": "text", "text": "Q"}]}
        after = _chat(processor, [user, {"role": "assistant", "content": content}, user]).split(stand_in)[1]
        ends = _first_special(processor, after.split("Q")[0])
        _OPENINGS[key] = after[:ends] if ends else ""
    return _OPENINGS[key]


def processor_text(processor, prompt):
    """The text the processor tokenises for a rendered prompt, what it writes itself included:
    PaliGemma's puts <bos> after the last image token and "\\n" (its prefix-LM separator) at the
    end. Only its text side runs (prepare_inputs_layout), with a 1x1 stand-in per image token."""
    from PIL import Image

    n = prompt.count(_image_token_text(processor) or MARKER)
    stand_ins = [[Image.new("RGB", (1, 1))] * n] if n else None
    return processor.prepare_inputs_layout(images=stand_ins, text=[prompt])[1][0]


def _first_special(processor, text):
    """The end of the first special token in `text` (the longest, where two start at once), or None."""
    ends = sorted((i, -len(s)) for s in special_tokens(processor.tokenizer) if (i := text.find(s)) >= 0)
    return ends[0][0] - ends[0][1] if ends else None


def with_stop(tokenizer, response):
    """A render_pair response as it is scored: + EOS unless it already ends with a special token
    (the template's end-of-turn token). llava-1.5: " blue" -> " blue</s>"; Qwen: "blue<|im_end|>" as is."""
    return response if any(response.endswith(s) for s in special_tokens(tokenizer)) else response + tokenizer.eos_token


def text_fingerprint(processor, question, answers):
    """A short hash of the token ids the rows (question + each answer, as build_inputs renders and
    stops them) tokenise to, images not expanded. 04 stores it with its reference log-probs and 06
    refuses them when its own rendering differs: a chat template that writes today's date (Mistral)
    or any change of template or tokenizer would otherwise reuse log-probs of another prompt."""
    h = hashlib.sha256()
    for a in answers:
        prompt, response = render_pair(processor, question, a)
        h.update(repr(processor.tokenizer(prompt + with_stop(processor.tokenizer, response))["input_ids"]).encode())
    return h.hexdigest()[:16]


def _process(processor, prompts, images, **kw):
    """processor(text=prompts, images=images, **kw) as a dict. Rows [x; x] (06's chosen and rejected
    rows, pair_logps) are processed once and doubled: every output lists rows, or images in row
    order, along its first dimension, so [v; v] is what the processor gives for [x; x], without
    processing every image twice (image processing was ~15 % of a Qwen2.5-VL training step)."""
    import torch

    h = len(prompts) // 2
    twice = h and len(prompts) == 2 * h and prompts[:h] == prompts[h:] and all(
        a is b for a, b in zip(images[:h], images[h:]))
    rows, ims = (prompts[:h], images[:h]) if twice else (prompts, images)
    has_images = any(len(i) for i in ims)
    enc = dict(processor(text=rows, images=[list(i) for i in ims] if has_images else None, **kw))
    if twice and all(torch.is_tensor(x) or isinstance(x, list) for x in enc.values()):
        return {k: torch.cat([x, x]) if torch.is_tensor(x) else x + x for k, x in enc.items()}
    if twice:  # an output of another kind: process all rows, as asked
        return dict(processor(text=prompts, images=[list(i) for i in images] if has_images else None, **kw))
    return enc


def build_inputs(processor, questions, images, answers=None, padding_side="right", add_eos=True):
    """Questions (+ answers) and their images -> one padded batch for the model.

    questions : list of B LLaVA-format questions with inline `<image>` markers
    images    : list of B lists of PIL images, one per marker, in marker order
    answers   : None for generation prompts; else B answers -> `labels` (prompt and padding
                masked with -100; the response of render_pair kept, + EOS where the template
                writes no end token and `add_eos`)
    returns   : dict of tensors the model takes (input_ids (B, T), attention_mask (B, T),
                pixel_values, image_grid_thw, token_type_ids, ... whatever the processor makes)
                plus `labels` (B, T) and `prompt_lens` (B,) when answers are given.
    The prompt's tokens are always those of the generation prompt, processed alone; the
    response's tokens follow them: the continuation of the joint tokenisation where the prompt's
    tokens survive it, else the response tokenised on its own (Qwen-style BPE merges "\\n" + "\\n").
    Use padding_side="left" for generation, "right" for training/scoring.
    """
    import torch

    tok = processor.tokenizer
    for i, (q, ims) in enumerate(zip(questions, images)):
        n = q.count(MARKER)
        if n != len(ims):
            raise ValueError(f"row {i}: question has {n} <image> markers but {len(ims)} images")
    prompts = [render_prompt(processor, q) for q in questions]
    # subtle: a template that writes the BOS itself must not get a second one from the tokenizer
    special = not (tok.bos_token and prompts[0].startswith(tok.bos_token))
    enc = _process(processor, prompts, images, padding=True, return_tensors="pt", add_special_tokens=special,
                   padding_side="right" if answers is not None else padding_side)
    if answers is None:
        return enc
    resp_ids = _response_ids(processor, questions, prompts, answers, special, add_eos)
    # re-lay every per-token tensor as [prompt | response | padding] (or padding first, on the left)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # per-token: laid out like input_ids and not an image output, chosen by the image processor's own
    # names (an image tensor can have the prompt batch's shape by chance: LFM2-VL's pixel_attention_mask)
    image_keys = set(getattr(getattr(processor, "image_processor", None), "model_input_names", None) or ())
    per_token = [k for k, v in enc.items()  # (B, T) or (B, T, ...): Mllama's cross_attention_mask (B, T, images, tiles)
                 if torch.is_tensor(v) and v.shape[:2] == ids.shape and k != "input_ids" and k not in image_keys]
    lens = mask.sum(1).tolist()
    T = max(n + len(r) for n, r in zip(lens, resp_ids))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {"input_ids": torch.full((len(prompts), T), pad_id, dtype=ids.dtype),
           **{k: torch.zeros((len(prompts), T, *enc[k].shape[2:]), dtype=enc[k].dtype) for k in per_token}}
    labels = torch.full((len(prompts), T), IGNORE_INDEX, dtype=ids.dtype)
    for i, (n, r) in enumerate(zip(lens, resp_ids)):
        m = n + len(r)
        at = slice(0, m) if padding_side == "right" else slice(T - m, T)
        r = torch.tensor(r, dtype=ids.dtype)
        out["input_ids"][i, at] = torch.cat([ids[i, :n], r])
        labels[i, at] = torch.cat([torch.full((n,), IGNORE_INDEX, dtype=ids.dtype), r])
        for k in per_token:  # the response is attended to (mask 1) and otherwise continues the prompt's last
            last = enc[k][i, n - 1:n]  # token (text: type 0; Mllama: sees every image), as generation extends them
            fill = torch.ones_like(last) if k == "attention_mask" else last
            out[k][i, at] = torch.cat([enc[k][i, :n], fill.expand(len(r), *last.shape[1:])])
    return {**enc, **out, "labels": labels, "prompt_lens": torch.tensor(lens)}


# ---------------------------------------------------------------------------------------------
# tensors: image spans, response log-probs, generation
# ---------------------------------------------------------------------------------------------
def image_spans(input_ids, image_token_id, n_images=None):
    """Runs of `image_token_id` per row -> list (B) of lists of (start, end), end exclusive.

    Two images with nothing between them form one run; with `n_images` (list of B counts)
    such a run is split into equal parts, and a count that does not fit raises ValueError.
    Example: ids [5, 9, 9, 7, 9, 9, 0] with image id 9 -> [[(1, 3), (4, 6)]].
    """
    import torch

    m = (input_ids == image_token_id).to(torch.int8)
    edges = torch.diff(torch.nn.functional.pad(m, (1, 1)), dim=1)  # +1 at a start, -1 after an end
    out = []
    for b in range(m.shape[0]):
        starts = (edges[b] == 1).nonzero().flatten().tolist()
        ends = (edges[b] == -1).nonzero().flatten().tolist()
        spans = list(zip(starts, ends))
        if n_images is not None and len(spans) != n_images[b]:
            spans = _split_runs(spans, n_images[b], b)
        out.append(spans)
    return out


def image_positions(input_ids, image_token_id, counts):
    """Each image's visual-token positions -> list (B) of lists of int arrays, one per image.

    counts: per row, each image's number of visual tokens (len of image_token_boxes' arrays): the
    k-th image owns the next counts[k] positions holding `image_token_id`, whatever separates them
    (Idefics3's tile markers). A count of None: the images' runs as image_spans splits them.
    Example: ids [5, 9, 9, 7, 9, 9, 0], image id 9, counts [[1, 3]] -> [[array([1]), array([2, 4, 5])]].
    """
    import numpy as np

    out = []
    for b, row_counts in enumerate(counts):
        found = (input_ids[b] == image_token_id).nonzero().flatten().cpu().numpy()
        if any(n is None for n in row_counts):
            spans = image_spans(input_ids[b:b + 1], image_token_id, [len(row_counts)])[0]
            out.append([np.arange(s, e) for s, e in spans])
            continue
        if sum(row_counts) != len(found):
            raise ValueError(f"row {b}: {len(found)} image-token positions, but the images have {row_counts}")
        out.append(np.split(found, np.cumsum(row_counts)[:-1]))
    return out


def _split_runs(spans, n, b):
    total = sum(e - s for s, e in spans)
    if n <= 0 or total % n:
        raise ValueError(f"row {b}: {len(spans)} image-token runs ({total} tokens) cannot be {n} images")
    size, out = total // n, []
    for s, e in spans:
        if (e - s) % size:
            raise ValueError(f"row {b}: an image-token run of {e - s} is not a multiple of {size}")
        out += [(p, p + size) for p in range(s, e, size)]
    return out


def next_token_logprobs(model, hidden):
    """hidden (N, H) states -> (N, V) float32 log-probs of the next token over the full vocabulary,
    with the LM head (and the model's final logit soft-capping, if it has one) on these N rows only."""
    import torch

    logits = model.get_output_embeddings()(hidden).float()  # (N, V)
    cap = getattr(getattr(model.config, "text_config", model.config), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def logps_at(model, hidden, targets):
    """hidden (N, H) states and targets (N,) next-token ids -> (N,) log-probs, with the LM head
    (and the model's final logit soft-capping, if it has one) applied to these N rows only."""
    return next_token_logprobs(model, hidden).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def last_hidden_state(model, inputs):
    """(B, T, H) final hidden states of the model's forward on `inputs`, no LM head: those of its base
    model (`model.model`, which transformers 5's VLMs have) or, where it has none (Llama 4: vision
    model, projector and a causal LM side by side), of the module holding the decoder layers, caught
    while the whole forward runs with the LM head on one position (logits_to_keep=1)."""
    base = getattr(model, "model", None)
    if base is not None:
        return base(**inputs).last_hidden_state
    layers, seen = decoder_layers(model), {}
    text_model = next(m for m in model.modules() if any(c is layers for c in m.children()))
    hook = text_model.register_forward_hook(lambda module, args, out: seen.update(h=out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    return seen["h"]


def response_logps(model, batch):
    """Log-probs of the labelled (response) tokens, LM head applied ONLY at those positions.

    batch   : build_inputs(..., answers=...) output (labels (B, T), -100 where not scored)
    returns : (sum_logps (B,), token_logps (B, T-1) — 0 where unscored, n_tokens (B,))
    Full-vocabulary logits over the prompt's hundreds of image tokens are never formed: the
    decoder's hidden states are gathered at scored positions first, (N, H) -> (N, V).
    """
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_lens")}
    inputs.setdefault("use_cache", False)  # scoring never decodes further: no KV cache to build
    hidden = last_hidden_state(model, inputs)  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    lp = logps_at(model, hidden[:, :-1][mask], targets[mask])  # (N,)
    token_logps = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    return token_logps.sum(-1), token_logps, mask.sum(-1)


def to_model(batch, model):
    """A build_inputs batch on the model's device, pixel values in the model's dtype, and each
    scored (labelled) token typed as generation types the tokens it generates (response_types)."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    if "labels" in batch:
        scored = batch["labels"] != IGNORE_INDEX  # (B, T) the answer's tokens (labels align with input_ids)
        for key, value in response_types(model, batch).items():
            batch[key] = batch[key].masked_fill(scored, value)
    return batch


def response_types(model, batch):
    """-> {key: value} for the batch's token-type inputs: the type generation gives a generated
    token, read from the model's own generation update (GenerationMixin._update_model_kwargs_for_generation,
    which each family may override). A processor types the response of a prompt+answer row like its
    prompt text; a prefix-LM's processor types all text as the bidirectional prefix, so its answer
    tokens would see later answer tokens. Scored as generated, they are causal.
      PaliGemma: {"token_type_ids": 1} (1 = causal suffix)   Gemma 3: {"token_type_ids": 0}
      Qwen3-VL, Gemma 4: {"mm_token_type_ids": 0}   llava: {}"""
    import torch
    from transformers.utils import ModelOutput

    keys = [k for k in ("token_type_ids", "mm_token_type_ids") if k in batch]
    if not keys or not hasattr(model, "_update_model_kwargs_for_generation"):
        return {}
    text = {k: torch.zeros(1, 1, dtype=batch[k].dtype) for k in keys}  # a prompt that ends in text
    after = model._update_model_kwargs_for_generation(ModelOutput(), dict(text))
    return {k: int(after[k][0, -1]) for k in keys}


def pair_logps(model, processor, questions, images, chosen, rejected):
    """Summed response log-probs (incl. EOS) of B chosen and B rejected answers, in ONE forward of
    2B rows [chosen; rejected] as 06 trains on them -> (chosen (B,), rejected (B,)) float lists."""
    import torch

    batch = to_model(build_inputs(processor, questions * 2, images * 2, answers=list(chosen) + list(rejected)), model)
    with torch.no_grad():
        lp = response_logps(model, batch)[0].float().cpu().tolist()
    return lp[: len(questions)], lp[len(questions):]


def generate(model, processor, questions, images, max_new_tokens=64, return_finished=False):
    """Greedy answers for a batch of questions (left-padded, same prompts as training).

    With `return_finished`, also a list of bools: did the answer end with EOS (False = it was
    cut at max_new_tokens)."""
    _, _, new, texts, eos = _greedy(model, processor, questions, images, max_new_tokens)
    if not return_finished:
        return texts
    return texts, [any(t in eos for t in row) for row in new.tolist()]


def _greedy(model, processor, questions, images, max_new_tokens, **kw):
    """model.generate, greedy, on the left-padded prompts -> (batch, its output, the new tokens
    (B, S), their texts, the stop token ids as a set). `kw`: what else generate should return."""
    import torch

    batch = to_model(build_inputs(processor, questions, images, padding_side="left"), model)
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, **kw,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = (out.sequences if kw.get("return_dict_in_generate") else out)[:, batch["input_ids"].shape[1]:]
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    return batch, out, new, texts, set(eos if isinstance(eos, list) else [eos])


def response_ids(processor, questions, answers):
    """The response token ids build_inputs(..., answers=answers) labels, row by row (render_pair's
    response + the stop token, tokenised as a continuation of the prompt), without the processor
    or any image: what a generated answer must equal token for token to be scored by generation."""
    tok = processor.tokenizer
    prompts = [render_prompt(processor, q) for q in questions]
    special = not (tok.bos_token and prompts[0].startswith(tok.bos_token))
    return _response_ids(processor, questions, prompts, answers, special)


def _response_ids(processor, questions, prompts, answers, special, add_eos=True):
    """Each answer's response tokens after its rendered prompt: the continuation of the joint
    tokenisation where the prompt's tokens survive it, else the response tokenised on its own."""
    tok = processor.tokenizer
    resp = [render_pair(processor, q, a, prompt=p)[1] for p, q, a in zip(prompts, questions, answers)]
    resp = [with_stop(tok, r) if add_eos else r for r in resp]
    if not getattr(processor, "chat_template", None):  # the text the processor tokenises (PaliGemma: + "\n")
        prompts = [processor_text(processor, p) for p in prompts]
    p_ids = tok(prompts, add_special_tokens=special)["input_ids"]  # the whole batch in one call each
    f_ids = tok([p + r for p, r in zip(prompts, resp)], add_special_tokens=special)["input_ids"]
    return [f[len(p):] if f[:len(p)] == p else tok(r, add_special_tokens=False)["input_ids"]
            for p, f, r in zip(p_ids, f_ids, resp)]


def generate_scored(model, processor, questions, images, max_new_tokens=64, keep_prompt=False):
    """generate(), plus what it computed on the way: per row the generated token ids through the
    first stop token and their log-probs under the model's raw logits (`output_logits`: before any
    logits processor, so the model's own distribution, as response_logps scores it), and the
    left-padded prompt batch it ran on (`input_ids`, for locating image tokens).
    -> dict texts, finished, tokens (B lists), token_logps (B lists), input_ids (B, P), and with
    keep_prompt `prompt`: what score_after_prompt needs to score other answers to these prompts from
    generation's own KV cache (None where the cache cannot be put back to the prompt, see there).
    See transformers' GenerationMixin.generate (`output_logits`, `return_dict_in_generate`)."""
    import torch
    from transformers import DynamicCache

    kw, first = {}, {}
    if keep_prompt and model.generation_config.cache_implementation in (None, "dynamic"):
        kw["past_key_values"] = DynamicCache(config=model.config.get_text_config(decoder=True))
        kw["past_key_values"].activate_past_recording()  # sliding-window layers keep what they drop until crop

    def prefill_positions(module, args, kwargs):  # the position ids generate made for the prompt (M-RoPE: 3-4 rows)
        first.setdefault("position_ids", kwargs.get("position_ids"))

    hook = model.register_forward_pre_hook(prefill_positions, with_kwargs=True)
    try:
        batch, out, new, texts, eos = _greedy(model, processor, questions, images, max_new_tokens, output_logits=True,
                                              return_dict_in_generate=True, **kw)
    finally:
        hook.remove()
    lps = torch.stack([torch.log_softmax(x.float(), dim=-1).gather(-1, new[:, k:k + 1]).squeeze(-1)
                       for k, x in enumerate(out.logits)], dim=1)  # (B, S): never the (B, S, V) of every step
    tokens, token_logps, finished = [], [], []
    for b, row in enumerate(new.tolist()):
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        n = len(row) if stop is None else stop + 1  # after the stop token: padding of a finished row
        tokens.append(row[:n]), token_logps.append(lps[b, :n].tolist()), finished.append(stop is not None)
    cache = kw.get("past_key_values")
    prompt = None if cache is None or not cache.is_croppable else {
        "cache": cache, "attention_mask": batch["attention_mask"], "position_ids": first.get("position_ids"),
        "first_logps": torch.log_softmax(out.logits[0].float(), dim=-1), "types": response_types(model, batch)}
    return {"texts": texts, "finished": finished, "tokens": tokens, "token_logps": token_logps,
            "input_ids": batch["input_ids"], "prompt": prompt}


def score_after_prompt(model, prompt, rows, responses):
    """Summed log-probs of response token lists (response_ids) after prompts `rows` of one
    generate_scored(..., keep_prompt=True) batch, from generation's KV cache: the prompt is never
    run again. Equal to response_logps over prompt + response (tests: 1e-5). Uses the cache up:
    call it once per batch. A row may be asked for twice (two answers to one prompt).
    How, as generation itself goes on: the first token's log-prob is the prefill's (generation's
    first step); the cache, cropped back to the prompt and its rows picked, is fed each response but
    its last token (right-padded), at the positions (M-RoPE's too) and token types generation gives
    generated tokens, so fed token t predicts response token t+1."""
    import torch

    cache, P = prompt["cache"], prompt["attention_mask"].shape[1]
    idx = torch.tensor(rows, device=prompt["attention_mask"].device)
    first = [float(prompt["first_logps"][b, r[0]]) for b, r in zip(rows, responses)]
    L = max(len(r) for r in responses) - 1  # tokens to feed
    if L == 0:
        return first
    cache.crop(P - cache.get_seq_length())  # a negative count: drop the generated tokens
    cache.reorder_cache(idx)  # beam search's row pick, which every layer kind has (LFM2's convolutions too)
    feed = torch.zeros((len(rows), L), dtype=torch.long, device=idx.device)  # response[:-1], right-padded
    targets = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long, device=idx.device)  # response[1:]
    for k, r in enumerate(responses):
        feed[k, :len(r) - 1], targets[k, :len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:])
    valid = targets != IGNORE_INDEX
    mask = torch.cat([prompt["attention_mask"][idx], valid.to(prompt["attention_mask"].dtype)], dim=1)
    pos = prompt["position_ids"]
    if pos is not None:  # (..., B, P) -> (..., rows, L): after the last prompt position
        pos = pos.index_select(-2, idx)[..., -1:] + 1 + torch.arange(L, device=pos.device)
    types = {k: torch.full_like(feed, v) for k, v in prompt["types"].items()}
    with torch.no_grad():
        hidden = last_hidden_state(model, {"input_ids": feed, "attention_mask": mask, "position_ids": pos,
                                           "past_key_values": cache, "use_cache": True, **types})  # (rows, L, H)
        lp = logps_at(model, hidden[valid], targets[valid])  # (N,)
    rest = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).masked_scatter(valid, lp).sum(-1)
    return [f + x for f, x in zip(first, rest.tolist())]
