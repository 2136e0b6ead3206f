"""
common.py — plumbing shared by the MIA-DPO stages (no method logic lives here).

  data   : read_rows (LLaVA JSON list or JSONL, errors name file/line/field), Skips,
           atomic_write / write_jsonl / write_sidecar, row_rng
  images : load_image (EXIF orientation, any mode -> RGB, errors name the path)
  model  : load_model (local HF checkpoint, offline), image_token_id, model_fingerprint
  prompts: render_prompt / render_pair (the model's own chat template, <image> kept in place),
           build_inputs (questions [+ answers] + images -> padded batch with labels)
  tensors: image_spans, response_logps + logps_at / next_token_logprobs (LM head only where needed), generate (greedy)
  pairs  : check_pair_row (the fields 05 and 06 read)
  answers: normalise_answer (one rule for "the same answer" in 04, 05 and 07)
  loops  : Progress (a bar on a terminal, a line every 30 s in a log), ResumeFile (resumable JSONL)
  recipes: apply_recipe (unset flags from the toy or the paper recipe), is_toy_model / is_toy_data
  01-03  : source rows (load_sources: read, validate, dedupe, --limit, check images; the stage
           says which rows it can use), companion pools, parallel map, atomic image save,
           the shared data/system flags. The method of 01-03 (question rewrite, companion
           draw, the 512-character and bounding-box rules) lives in 01_make_sequence.py and
           02_make_grid.py.

The same build_inputs serves generation (04, 07) and training (06), so the prompt a model is
trained on can never differ from the prompt it answered — the released code had that bug.
Heavy imports (torch, transformers) happen inside the functions that need them, so stages
that only move data (01-03, 05) start in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import string
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

IGNORE_INDEX = -100
# LLaVA-1.5's conversation format, used only when a processor carries no chat template.
FALLBACK_TEMPLATE = "USER: {question} ASSISTANT:"


# ---------------------------------------------------------------------------------------------
# data: reading LLaVA-format rows
# ---------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Bad input, located: `DataError(path, line, field, msg)` prints as `path:line: field: msg`."""

    def __init__(self, path, line, field, msg):
        self.path, self.line, self.field, self.msg = str(path), line, field, msg
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {field}: {msg}" if field else f"{where}: {msg}")


def read_rows(path, on_error="raise", skips=None):
    """Yield `(line, row)` from a LLaVA JSON list (`[{...}, ...]`) or JSONL file.

    `line` is the 1-based line of the row in the file (for a JSON list, the line its object
    starts on). A malformed JSONL line raises DataError naming file and line, or — with
    `on_error="skip"` — is recorded in `skips` (a Skips) and passed over. Rows are not
    validated here: stages call `check_llava_row` (or their own check) on what they use.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # a JSON list, as LLaVA-665k is shipped
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:  # a broken list cannot be read past the error
            raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        starts = _object_start_lines(text, len(rows))
        for i, row in enumerate(rows):
            line = starts[i] if starts else i + 1
            if not isinstance(row, dict):
                _bad(path, line, None, f"item {i} is {type(row).__name__}, not an object", on_error, skips)
                continue
            yield line, row
        return
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            _bad(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})", on_error, skips)
            continue
        if not isinstance(row, dict):
            _bad(path, line, None, f"a {type(row).__name__}, not an object", on_error, skips)
            continue
        yield line, row


def _bad(path, line, field, msg, on_error, skips):
    if on_error != "skip":
        raise DataError(path, line, field, msg)
    if skips is not None:
        skips.add(None, f"malformed row: {msg}", path=path, line=line)


def _object_start_lines(text, n):
    """Line on which each top-level object of a JSON list starts (best effort, for messages)."""
    starts, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if depth == 1:
                starts.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return starts if len(starts) == n else None


def check_llava_row(row, path=None, line=None):
    """Check the LLaVA fields a stage relies on; raise DataError naming the field.

    Returns the row's image paths as a list (`image` may be a string or a list of strings).
    """
    if "id" not in row or not isinstance(row["id"], (str, int)) or row["id"] == "":
        raise DataError(path, line, "id", "missing or not a string/integer")
    imgs = row.get("image")
    if isinstance(imgs, str):
        imgs = [imgs]
    if not isinstance(imgs, list) or not imgs or not all(isinstance(p, str) and p for p in imgs):
        raise DataError(path, line, "image", "missing, or not a path / list of paths")
    conv = row.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(path, line, "conversations", "missing or shorter than one human/gpt turn")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(path, line, f"conversations[{i}].value", "missing or not a string")
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want:
            raise DataError(path, line, f"conversations[{i}].from", f"is {turn.get('from')!r}, expected {want!r}")
    return imgs


class Skips:
    """Rows a stage passed over, with reasons: counted, listed in the sidecar, summarised."""

    def __init__(self, keep=1000):
        self.counts, self.rows, self.keep = Counter(), [], keep

    def add(self, row_id, reason, path=None, line=None):
        self.counts[reason.split(":")[0]] += 1
        if len(self.rows) < self.keep:  # the sidecar lists the first `keep`, counts all
            self.rows.append({"id": row_id, "file": None if path is None else str(path), "line": line, "reason": reason})

    def __len__(self):
        return sum(self.counts.values())

    def summary(self):
        return ", ".join(f"{n} {r}" for r, n in self.counts.most_common()) or "none"

    def to_json(self):
        return {"total": len(self), "by_reason": dict(self.counts), "rows": self.rows}


def row_rng(seed, row_id):
    """Per-row randomness: independent of row order, sharding and worker count."""
    return random.Random(f"{seed}:{row_id}")


# ---------------------------------------------------------------------------------------------
# data: writing, atomically
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds.

    A crash or exception mid-write leaves any previous `path` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); the result is an ordinary file
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path, rows):
    """Write rows as JSONL, atomically; returns the number written."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def sidecar_path(out_path):
    return Path(str(out_path) + ".meta.json")


def write_sidecar(out_path, args=None, counts=None, skips=None, **extra):
    """Record how `out_path` was made: script, command line, arguments, counts, skipped rows."""
    meta = {
        "output": str(out_path),
        "script": Path(sys.argv[0]).name,
        "argv": sys.argv[1:],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} if args is not None else None,
        "counts": counts or {},
        "skipped": skips.to_json() if skips is not None else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }
    with atomic_write(sidecar_path(out_path)) as f:
        json.dump(meta, f, indent=1, default=str)
    return meta


# ---------------------------------------------------------------------------------------------
# data: pair rows (04 writes them, 05 filters them, 06 trains on them, 07 scores them)
# ---------------------------------------------------------------------------------------------
def check_pair_row(row, path=None, line=None):
    """Check the fields every reader of a pair relies on; raise DataError naming the field.

    Needs `id`, `image` (a path or a list of paths), non-empty `prompt` / `chosen` / `rejected`
    strings, one `<image>` marker in the prompt per image, and a `rejected` that is a different
    answer (after normalise_answer). Stored reference log-probs, if present, must be two finite
    numbers with `ref_model.fingerprint`. Returns the image paths as a list.
    """
    import math

    def bad(field, msg):
        raise DataError(path, line, field, msg)

    if not isinstance(row.get("id"), (str, int)) or row.get("id") == "":
        bad("id", "missing or not a string/integer")
    imgs = [row["image"]] if isinstance(row.get("image"), str) else row.get("image")
    if not isinstance(imgs, list) or not imgs or not all(isinstance(x, str) and x for x in imgs):
        bad("image", "missing, or not a path / list of paths")
    for f in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(f), str) or not row[f].strip():
            bad(f, "missing, empty or not a string")
    if row["prompt"].count(MARKER) != len(imgs):
        bad("prompt", f"{row['prompt'].count(MARKER)} <image> markers for {len(imgs)} images")
    if normalise_answer(row["chosen"]) == normalise_answer(row["rejected"]):
        bad("rejected", f"the same answer as chosen ({row['rejected']!r} vs {row['chosen']!r})")
    if "ref_chosen_logps" in row or "ref_rejected_logps" in row:
        ref = (row.get("ref_chosen_logps"), row.get("ref_rejected_logps"))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ref):
            bad("ref_chosen_logps", "ref_chosen_logps / ref_rejected_logps must both be finite numbers")
        if not isinstance(row.get("ref_model"), dict) or not row["ref_model"].get("fingerprint"):
            bad("ref_model", "stored reference log-probs without ref_model.fingerprint")
    return imgs


# ---------------------------------------------------------------------------------------------
# answers: one rule for "the same answer", used by 04 (is it wrong?), 05 and 07 (is it right?)
# ---------------------------------------------------------------------------------------------
MARKER = "<image>"
_ARTICLES = frozenset(("a", "an", "the"))
_EDGE_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d"


def normalise_answer(text):
    """Case, white space, punctuation at the edges of words and the articles a/an/the do not make an
    answer different: "The Red." -> "red";  " light  blue " -> "light blue";  "It's red!" -> "it's red";
    "3.5" -> "3.5" (inner punctuation stays: 3.5 is not 35); an answer of articles only keeps them ("A" -> "a")."""
    words = [w.strip(_EDGE_PUNCT) for w in str(text).lower().split()]
    kept = [w for w in words if w and w not in _ARTICLES]
    return " ".join(kept or [w for w in words if w])


# ---------------------------------------------------------------------------------------------
# long loops: progress that also reaches a log file, and resumable output
# ---------------------------------------------------------------------------------------------
class Progress:
    """Progress of a long loop: a tqdm bar on a terminal; when stdout is a file or a pipe (a
    cluster job's log), one line every `every` seconds (default $MIA_PROGRESS_SECONDS or 30):
      `04 pairs: 1200/4000 rows (30.0%) | 11.8 rows/s | ETA 3m57s | pairs 210`
    Use as a context manager; update(n, **postfix) after each batch."""

    def __init__(self, total, desc, unit="row", initial=0, every=None, stream=None):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, initial, {}
        self.stream = stream or sys.stdout
        self.every = float(os.environ.get("MIA_PROGRESS_SECONDS", 30)) if every is None else every
        self.t0 = self.last = time.time()
        self.start_n, self.bar = initial, None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=False, file=self.stream)

    def update(self, n=1, **postfix):
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**self.postfix)
        elif time.time() - self.last >= self.every:
            self.last = time.time()
            print(self.line(), file=self.stream, flush=True)

    def line(self):
        rate = (self.n - self.start_n) / max(time.time() - self.t0, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 and self.total else float("nan")
        eta = "?" if left != left else f"{int(left // 60)}m{int(left % 60):02d}s"
        post = "".join(f" | {k} {v}" for k, v in self.postfix.items())
        share = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s{share} | {rate:.3g} {self.unit}s/s | ETA {eta}{post}"

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResumeFile:
    """Finished records of a long stage (04's pairs, 07's answers), one JSONL line each behind a
    header line `{"resume": config}`; a killed run restarts where it stopped.

    Opening reads what an earlier run left: a torn last line (the write a kill interrupted) is
    dropped, a file left with another `config` (other inputs or settings) is refused with a
    SystemExit naming it. `done` maps record[key] -> record. keep(keys) rewrites the file with
    the header and only those records (atomically); add(records) appends, flushed and fsynced,
    so everything add() returned from survives a kill; remove() deletes the file at the end.
    """

    def __init__(self, path, config, key):
        self.path, self.config, self.key, self.done, self._f = Path(path), config, key, {}, None
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        try:
            head = json.loads(lines[0]) if lines else {"resume": config}
        except json.JSONDecodeError:
            head = {}
        if head.get("resume") != config:
            raise SystemExit(f"{self.path}: left by a run with other inputs or settings; delete it to start "
                             f"over, or rerun with the same arguments to resume")
        for n, raw in enumerate(lines[1:], 2):
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                if n == len(lines):
                    break  # the write a kill interrupted
                raise SystemExit(f"{self.path}:{n}: corrupt line; delete the file to start over") from None
            self.done[rec[key]] = rec
        self.keep(self.done)

    def keep(self, keys):
        self.done = {k: self.done[k] for k in keys}
        with atomic_write(self.path) as f:
            f.write(json.dumps({"resume": self.config}) + "\n")
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.done.values())

    def add(self, records):
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))  # one write per batch
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.update((r[self.key], r) for r in records)

    def remove(self):
        if self._f is not None:
            self._f.close()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# recipes: toy defaults for the embedded demo, the paper's for a real checkpoint
# ---------------------------------------------------------------------------------------------
def is_toy_model(path):
    """True for a model 00 built (its directory holds toy_report.json); never for a real checkpoint."""
    return path is not None and (Path(path) / "toy_report.json").is_file()


def is_toy_data(path):
    """True for a file in a folder 00_make_toy.py wrote (its sidecar train.json.meta.json says so),
    and for None (a stage's --data left unset reads the toy world)."""
    if path is None:
        return True
    meta = Path(path).parent / "train.json.meta.json"
    try:
        return json.loads(meta.read_text()).get("script") == "00_make_toy.py"
    except (OSError, ValueError):
        return False


def apply_recipe(args, recipes, toy, stage, why="", quiet=False):
    """Fill every flag left unset (None) from a named recipe: args.recipe "toy" or "paper", or
    "auto" = "toy" when the stage's input is the toy world (`toy`), else "paper" — so a real
    checkpoint never silently gets the toy's settings. Explicit flags always win. Prints which
    recipe and values were used; args.recipe and args.recipe_values land in the sidecar."""
    name = args.recipe if args.recipe != "auto" else ("toy" if toy else "paper")
    filled = {k: v for k, v in recipes[name].items() if getattr(args, k) is None}
    for k, v in filled.items():
        setattr(args, k, v)
    how = "--recipe" if args.recipe != "auto" else f"auto: {why or ('toy input' if toy else 'not the toy world')}"
    args.recipe, args.recipe_values = name, filled
    flag = lambda k, v: f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}"  # noqa: E731
    shown = " ".join(flag(k.replace("_", "-"), v) for k, v in filled.items())
    if not quiet:
        print(f"{stage}: recipe {name} ({how}){': ' + shown if shown else ''}", flush=True)
    return name


# ---------------------------------------------------------------------------------------------
# system
# ---------------------------------------------------------------------------------------------
def run_stage(main, get_args):
    """What `python 0N_stage.py` runs: main(get_args()), and bad input (a DataError, located as
    file:line: field) ends the run with that one line instead of a traceback."""
    try:
        main(get_args())
    except DataError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: {e}")


def add_threads_flag(group):
    group.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")


def set_threads(n):
    """--threads: torch's intra-op threads for this process (0 leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
class ImageError(OSError):
    """An image that is missing or cannot be decoded; the message names the path."""


def load_image(root, rel):
    """Open `root/rel` as an RGB PIL image, EXIF orientation applied.

    Modes: RGBA/LA/transparent palette are composited on white (LLaVA's `.convert("RGB")` would
    show whatever colour hides under transparent pixels, often black); CMYK, P, L, 1, 16-bit and
    float grayscale are converted. Raises ImageError naming the path when missing or unreadable.
    """
    from PIL import Image, ImageOps

    path = Path(rel) if root is None or os.path.isabs(rel) else Path(root) / rel
    if not path.is_file():
        raise ImageError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL signals corrupt files with all three
        raise ImageError(f"{path}: cannot read image ({e})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode == "RGB":  # exif_transpose already returned a copy detached from the file
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I", "F"):  # scale wide grayscale to 8 bit
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(a.max(), 1.0)
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# model and processor
# ---------------------------------------------------------------------------------------------
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(path, dtype="auto", device="cpu", attn_implementation=None, adapter=None):
    """Load an image-text-to-text checkpoint and its processor from a LOCAL directory.

    Never downloads: `path` must be a directory holding `config.json` (as `save_pretrained` or
    `huggingface-cli download` leave it). `dtype`: one of DTYPES ("auto" = the checkpoint's).
    `attn_implementation`: "eager", "sdpa", "flash_attention_2" or None (transformers' default).
    `adapter`: a LoRA adapter directory (06's OUT/adapter), merged into the weights on load.
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
    return model, processor


def load_processor(path):
    """The processor of a LOCAL checkpoint: `AutoProcessor.from_pretrained(path)`, also where
    torchvision cannot be imported.

    In transformers 5.23 the Qwen2/2.5/3-VL, Qwen3.5, LLaVA-OneVision, InternVL, SmolVLM and
    Gemma 4 processors hold a video processor, and every video processor needs torchvision. On a
    machine where torchvision imports (a GPU user's), this IS AutoProcessor, video processor
    included. Where it does not (PyPI's torchvision is a CUDA build that fails beside a CPU torch),
    such a processor is built from the same files, as the same class, with the PIL image processor
    and, for the video part, its saved settings only (a dict, readable as attributes: SmolVLM's
    apply_chat_template reads `.num_frames`; save_pretrained writes it back): text and images are
    processed exactly as AutoProcessor would, and a call with videos raises. Processors without
    a video part load through AutoProcessor either way (it then picks the PIL image processor).
      load_processor("models/qwen2-vl")  ->  Qwen2VLProcessor (.video_processor: settings only here)
    """
    import inspect

    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.utils import is_torchvision_available

    path = Path(path)

    def torchvision_imports():
        if not is_torchvision_available():  # not installed: transformers uses its PIL processors
            return False
        try:  # installed, but a build that does not match torch fails here, not at install time
            import torchvision.transforms.v2.functional  # noqa: F401
        except (ImportError, OSError, RuntimeError, AttributeError):
            return False
        return True

    def read(name):
        f = path / name
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    def processor_class():  # where AutoProcessor looks for it, in the same order
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            if read(name).get("processor_class"):
                return processor_class_from_name(read(name)["processor_class"])
        name = PROCESSOR_MAPPING_NAMES.get(read("config.json").get("model_type"))
        return processor_class_from_name(name) if name else None

    works = torchvision_imports()
    broken = is_torchvision_available() and not works  # installed, yet transformers' torchvision paths fail
    cls = processor_class()
    if works or cls is None or (not broken and "video_processor" not in cls.get_attributes()):
        return AutoProcessor.from_pretrained(path, local_files_only=True)

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

    # No usable torchvision: each part loaded the way AutoProcessor loads it, the video part as settings.
    settings, _ = cls.get_processor_dict(path, local_files_only=True)  # processor_config.json + chat template
    parts = []
    for attr in cls.get_attributes():
        if attr == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path, local_files_only=True))
        elif attr == "image_processor":
            parts.append(AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil"))
        elif attr in ("feature_extractor", "audio_processor"):
            parts.append(AutoFeatureExtractor.from_pretrained(path, local_files_only=True))
        elif attr == "video_processor":
            parts.append(VideoSettings(settings.get(attr) or read("video_preprocessor_config.json")))
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


def image_token_id(model_or_config):
    """The id that marks visual-token positions in input_ids (`image_token_id` in transformers 5)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in ("image_token_id", "image_token_index"):
        if getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    raise ValueError("model config names no image token (image_token_id / image_token_index)")


# ---------------------------------------------------------------------------------------------
# prompts: the model's own chat template, with every <image> kept where the question puts it
# ---------------------------------------------------------------------------------------------
def render_prompt(processor, question):
    """LLaVA-format question (with inline `<image>` markers) -> the model's prompt text.

    subtle: llava-hf templates render a message's image items first and its text after, which
    would pull every `<image>` away from its `ImageK:` label. The question is therefore passed
    as ONE text item with its markers inline; the template then only wraps it, e.g. for
    llava-1.5-7b-hf: `USER: Image1:<image>\\nIn Image1, what ...? ASSISTANT:`.
    """
    question = _image_markers(processor, question)
    template = getattr(processor, "chat_template", None)
    if not template:
        return FALLBACK_TEMPLATE.format(question=question)
    msgs = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def render_pair(processor, question, answer):
    """-> (prompt_text, response_text): the template's full conversation split at the prompt.

    The response is what the template puts after the prompt for this answer, trailing white
    space removed (llava-1.5's template ends every turn with a space); the caller adds EOS.
    """
    prompt = render_prompt(processor, question)
    template = getattr(processor, "chat_template", None)
    if not template:
        return prompt, " " + answer.strip()
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": _image_markers(processor, question)}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
    ]
    full = processor.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the rendered conversation does not start with the rendered prompt")
    return prompt, full[len(prompt):].rstrip()


def _image_markers(processor, question):
    token = getattr(processor, "image_token", None) or "<image>"
    return question if token == "<image>" else question.replace("<image>", token)


def build_inputs(processor, questions, images, answers=None, padding_side="right", add_eos=True):
    """Questions (+ answers) and their images -> one padded batch for the model.

    questions : list of B LLaVA-format questions with inline `<image>` markers
    images    : list of B lists of PIL images, one per marker, in marker order
    answers   : None for generation prompts; else B answers -> `labels` (prompt and padding
                masked with -100, response + EOS kept)
    returns   : dict of tensors the model takes (input_ids (B, T), attention_mask (B, T),
                pixel_values, ...) plus `labels` (B, T) and `prompt_lens` (B,) when answers given.
    Use padding_side="left" for generation, "right" for training/scoring.
    """
    import torch

    tok = processor.tokenizer
    if answers is None:
        texts, prompts = [render_prompt(processor, q) for q in questions], None
    else:
        pairs = [render_pair(processor, q, a) for q, a in zip(questions, answers)]
        eos = tok.eos_token if add_eos else ""
        prompts = [p for p, _ in pairs]
        texts = [p + (r if not eos or r.endswith(eos) else r + eos) for p, r in pairs]
    for i, (q, ims) in enumerate(zip(questions, images)):
        n = q.count("<image>")
        if n != len(ims):
            raise ValueError(f"row {i}: question has {n} <image> markers but {len(ims)} images")
    has_images = any(len(ims) for ims in images)
    # subtle: a template that writes the BOS itself must not get a second one from the tokenizer
    special = not (tok.bos_token and texts[0].startswith(tok.bos_token))
    enc = processor(text=texts, images=[list(ims) for ims in images] if has_images else None,
                    padding=True, padding_side=padding_side, return_tensors="pt", add_special_tokens=special)
    batch = dict(enc)
    if answers is None:
        return batch
    # Prompt length in the expanded sequence = its unexpanded token count + what the
    # processor added when it expanded each <image> into visual tokens (same for full text).
    p_ids = tok(prompts, add_special_tokens=special)["input_ids"]
    f_ids = tok(texts, add_special_tokens=special)["input_ids"]
    mask = batch["attention_mask"]
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    prompt_lens = []
    for i in range(len(texts)):
        if f_ids[i][: len(p_ids[i])] != p_ids[i]:
            raise ValueError(f"row {i}: prompt tokens change when the answer follows them; "
                             f"the template and tokenizer split at the prompt/answer boundary")
        expanded = int(mask[i].sum())
        plen = len(p_ids[i]) + expanded - len(f_ids[i])
        start = 0 if padding_side == "right" else mask.shape[1] - expanded
        labels[i, start + plen : start + expanded] = batch["input_ids"][i, start + plen : start + expanded]
        prompt_lens.append(plen)
    batch["labels"] = labels
    batch["prompt_lens"] = torch.tensor(prompt_lens)
    return batch


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
    hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    lp = logps_at(model, hidden[:, :-1][mask], targets[mask])  # (N,)
    token_logps = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    return token_logps.sum(-1), token_logps, mask.sum(-1)


def to_model(batch, model):
    """A build_inputs batch on the model's device, pixel values in the model's dtype."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


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
    import torch

    batch = to_model(build_inputs(processor, questions, images, padding_side="left"), model)
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    if not return_finished:
        return texts
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=new.device)
    return texts, torch.isin(new, eos).any(dim=1).tolist()


# ---------------------------------------------------------------------------------------------
# source rows for stages 01-03: single-image LLaVA samples in, multi-image samples out
# ---------------------------------------------------------------------------------------------


class SkipRow(Exception):
    """A row the stage passes over; the message is the reason (`kind: detail`)."""


def subset_of(path):
    """Sub-dataset of an image path = its first component ("coco/train2017/x.jpg" -> "coco")."""
    parts = path.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else ""


def parse_counts(text, allowed):
    """"2:0.55,3:0.45" -> {2: 0.55, 3: 0.45}; a bare "3" -> {3: 1.0}. Weights need not sum to 1."""
    out = {}
    for part in text.split(","):
        n, _, w = part.strip().partition(":")
        try:
            n, w = int(n), float(w or 1)
        except ValueError:
            raise ValueError(f"bad count spec {part!r} (want N or N:weight)") from None
        if n not in allowed or w < 0:
            raise ValueError(f"count {n} not one of {sorted(allowed)}, or negative weight")
        out[n] = w
    if not sum(out.values()) > 0:
        raise ValueError(f"counts {text!r}: weights sum to 0")
    return out


TOY = Path(__file__).resolve().parent / "data" / "toy"


def fit(w, h, W, H):
    """Largest (w', h') with the aspect of (w, h) inside W x H: fit(64, 32, 448, 448) -> (448, 224)."""
    if w * H >= h * W:  # wider than the box: the width binds
        return W, max(1, min(H, round(h * W / w)))
    return max(1, min(W, round(w * H / h))), H


@dataclass
class Source:
    id: str  # str(row["id"])
    image: str  # the single image path, relative to the image root
    subset: str
    line: int
    row: dict
    questions: list
    answers: list


def output_row(new_id, images, turns, src_row, mia):
    """LLaVA row: id, image list, conversations, the source's other fields unchanged, mia."""
    extra = {k: v for k, v in src_row.items() if k not in ("id", "image", "conversations", "mia")}
    return {"id": new_id, "image": images, "conversations": turns, **extra, "mia": mia}


def load_sources(args, skips, parse):
    """Read, validate, de-duplicate, limit and image-check the source rows -> (sources, n_read).

    `parse(conversations, image) -> (questions, answers)` is the stage's own rule for which
    single-image rows it can use (it raises SkipRow with the reason otherwise); rows that are
    text-only, multi-image or malformed are passed over here. Sources come back sorted by id.
    --limit keeps a seeded random subset (smallest row_rng(seed, "limit:id") draws), so it too
    is independent of the input order.
    """
    by_id, n_read = {}, 0
    for line, row in read_rows(args.data, on_error=args.on_error, skips=skips):
        n_read += 1
        rid = row.get("id")
        try:
            if "image" not in row:
                raise SkipRow("text-only row")
            imgs = check_llava_row(row, args.data, line)
            if len(imgs) > 1:
                raise SkipRow(f"multi-image row: {len(imgs)} images")
            qs, ans = parse(row["conversations"], imgs[0])
        except DataError as e:
            if args.on_error != "skip":
                raise
            skips.add(rid, f"malformed row: {e.field}: {e.msg}", args.data, line)
            continue
        except SkipRow as e:
            skips.add(rid, str(e), args.data, line)
            continue
        src = Source(str(rid), imgs[0], subset_of(imgs[0]), line, row, qs, ans)
        by_id.setdefault(src.id, []).append(src)
    sources = []
    for rid, group in sorted(by_id.items()):
        group.sort(key=lambda s: json.dumps(s.row, sort_keys=True, ensure_ascii=False))
        sources.append(group[0])
        for s in group[1:]:
            skips.add(rid, "duplicate id", args.data, s.line)
    if args.limit and len(sources) > args.limit:
        sources.sort(key=lambda s: row_rng(args.seed, f"limit:{s.id}").random())
        sources = sorted(sources[: args.limit], key=lambda s: s.id)
    paths = sorted({s.image for s in sources})
    check = partial(check_image, args.image_root, full=args.verify == "full")
    bad = {p: r for p, r in zip(paths, run_parallel(check, paths, args.workers, "check images")) if r}
    for s in sources:
        if s.image in bad:
            skips.add(s.id, bad[s.image], args.data, s.line)
    return [s for s in sources if s.image not in bad], n_read


def check_image(root, rel, full=False):
    """None if `root/rel` opens as an image (header only, or fully decoded with full=True), else a reason."""
    from PIL import Image

    path = Path(rel) if os.path.isabs(rel) else Path(root) / rel
    if not path.is_file():
        return f"missing image: {rel}"
    try:
        if full:
            load_image(root, rel)
        else:
            with Image.open(path) as im:
                if min(im.size) < 1:
                    return f"unreadable image: {rel} (empty)"
    except (ImageError, OSError, ValueError, SyntaxError) as e:
        return f"unreadable image: {rel} ({e})"
    return None


def build_pools(sources):
    """Companion pools: {sub-dataset: sorted unique paths, None: all paths}; order-free."""
    pools = {}
    for s in sources:
        pools.setdefault(s.subset, set()).add(s.image)
    pools = {k: sorted(v) for k, v in pools.items()}
    pools[None] = sorted({p for v in pools.values() for p in v})
    return pools


def run_parallel(fn, items, workers=1, desc=None):
    """[fn(x) for x in items] in item order, over `workers` processes (1: in this process)."""
    out = []
    with Progress(len(items), desc or "items", unit="item") as bar:
        if workers <= 1 or len(items) < 2:
            results = map(fn, items)
        else:
            import multiprocessing as mp

            pool = mp.Pool(workers)
            results = pool.imap(fn, items, chunksize=max(1, min(32, len(items) // (workers * 8))))
        for r in results:
            out.append(r)
            bar.update()
        if workers > 1 and len(items) >= 2:
            pool.close()
            pool.join()
    return out


def file_name(row_id, *parts):
    """A file name for an output image: the id made path-safe + a digest of what it shows, so a
    re-run with other settings never overwrites an image an older JSONL still points to."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id)[:150]
    return f"{safe}-{hashlib.sha1(json.dumps([row_id, *parts]).encode()).hexdigest()[:10]}"


def save_jpeg(im, path, quality):
    """Save atomically: a temp name in the same folder, then rename (no half-written images)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        im.save(tmp, "JPEG", quality=quality)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def image_ref(image_out, image_root):
    """How output rows name the folder of created images: relative to the image root when
    inside it (one --image-root then resolves every path), else absolute."""
    out, root = Path(image_out).resolve(), Path(image_root).resolve()
    return out.relative_to(root).as_posix() if out.is_relative_to(root) else out.as_posix()


def resolve_paths(args, name, image_dir=None):
    """Fill unset --data/--image-root/--out (and --image-out) with the toy world's paths."""
    if args.data is None:
        args.data = TOY / f"{args.split}.json"
        if not args.data.is_file():
            sys.exit(f"{args.data} not found: build the toy data first with `python 00_make_toy.py`")
        args.image_root = args.image_root or TOY / "images"
        args.out = args.out or TOY / (f"{name}.jsonl" if args.split == "train" else f"{name}-{args.split}.jsonl")
    if args.image_root is None:
        sys.exit("--image-root is required with --data (the folder the rows' image paths are relative to)")
    args.out = args.out or Path(args.data).with_name(f"{Path(args.data).stem}-{name}.jsonl")
    if Path(args.out).resolve() == Path(args.data).resolve():
        sys.exit("--out would overwrite --data; inputs are never modified")
    if image_dir is not None and getattr(args, "image_out", None) is None:
        args.image_out = Path(args.image_root) / image_dir


def add_shared_args(p, image_out=None):
    """The data and system flags of stages 01-03 -> the argument group for method flags."""
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="LLaVA-format JSON list or JSONL (default: toy data/toy/<split>.json)")
    g.add_argument("--split", default="train", choices=("train", "dev", "heldout"), help="toy split when --data is not given")
    g.add_argument("--image-root", type=Path, help="folder the rows' image paths are relative to (toy: data/toy/images)")
    g.add_argument("--out", type=Path, help="output JSONL (toy: data/toy/<format>.jsonl)")
    if image_out:
        g.add_argument("--image-out", type=Path, help=f"folder for the created images (default: <image-root>/{image_out})")
    g.add_argument("--limit", type=int, help="use a seeded random subset of this many source rows; 0: all "
                   "(default: the recipe's, toy: a few thousand, paper: all)")
    m = p.add_argument_group("method")
    m.add_argument("--recipe", choices=("auto", "toy", "paper"), default="auto",
                   help="where unset flags come from: auto = toy for the toy world's data, paper for any other")
    m.add_argument("--seed", type=int, default=0, help="with the row id, seeds every random choice of a row")
    s = p.add_argument_group("system")
    s.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="malformed line/row: stop naming file:line, or count and skip")
    s.add_argument("--verify", choices=("header", "full"), default="header",
                   help="image check before use: read the header (fast), or decode fully (catches truncated files)")
    return m


def finish(name, args, rows, skips, counts, t0):
    """End of a stage 01-03 run: rows sorted by id (so output does not depend on input order or
    workers), JSONL and sidecar written atomically, one summary line printed."""
    rows.sort(key=lambda r: r["id"])
    write_jsonl(args.out, rows)  # after every image it references is on disk
    write_sidecar(args.out, args, counts=counts, skips=skips)
    fmt = lambda v: " ".join(f"{k}:{x}" for k, x in v.items()) if isinstance(v, dict) else v  # noqa: E731
    extra = " | ".join(f"{k} {fmt(v)}" for k, v in counts.items() if k not in ("rows_read", "rows_written"))
    print(f"{name}: {counts.get('rows_read', 0)} rows read -> {len(rows)} written to {args.out} | {extra} | "
          f"skipped {len(skips)} ({skips.summary()}) | {time.time() - t0:.1f} s")
