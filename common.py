"""
common.py — plumbing shared by the MIA-DPO stages (no method logic lives here).

  data   : read_rows (LLaVA JSON list or JSONL, errors name file/line/field), Skips,
           atomic_write / write_jsonl / write_sidecar, row_rng
  images : load_image (EXIF orientation, any mode -> RGB, errors name the path)
  model  : load_model (local HF checkpoint, offline), image_token_id, model_fingerprint,
           cap_image_tokens / image_settings_id (the visual-token budget and its record)
  prompts: image_placeholder / render_prompt / render_pair (the family's own chat template: its
           image item in place of each <image>, the answer turn up to its end-of-turn token),
           build_inputs (questions [+ answers] + images -> padded batch with labels)
  tensors: image_spans / image_positions, response_logps + logps_at / next_token_logprobs (LM head
           only where needed), generate (greedy)
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
import math
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


def add_max_image_tokens_flag(group):
    group.add_argument("--max-image-tokens", type=int, metavar="N",
                       help="cap every image at N visual tokens with the processor's own resolution setting "
                            "(Qwen max_pixels, tiles, anyres grids; common.cap_image_tokens); give 04, 06 and 07 the same")


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


def load_model(path, dtype="auto", device="cpu", attn_implementation=None, adapter=None, max_image_tokens=None):
    """Load an image-text-to-text checkpoint and its processor from a LOCAL directory.

    Never downloads: `path` must be a directory holding `config.json` (as `save_pretrained` or
    `huggingface-cli download` leave it). `dtype`: one of DTYPES ("auto" = the checkpoint's).
    `attn_implementation`: "eager", "sdpa", "flash_attention_2" or None (transformers' default).
    `adapter`: a LoRA adapter directory (06's OUT/adapter), merged into the weights on load.
    `max_image_tokens`: cap_image_tokens(processor, N), the same cap for 04, 06 and 07 (--max-image-tokens).
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
    if max_image_tokens:
        cap_image_tokens(processor, max_image_tokens)
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
        return _emitted_image_tokens(processor, [Image.new("RGB", (w, h))])[0]

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
    elif getattr(ip, "do_image_splitting", False):  # Idefics3 / SmolVLM: tiles of max_image_size + a global view
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
# Passed to every chat template (a template that does not read a variable ignores it): thinking
# models (Qwen3.5, Gemma 4) are aligned and evaluated in their non-thinking mode, where the
# answer follows the generation prompt directly.
TEMPLATE_KWARGS = {"enable_thinking": False}
_PLACEHOLDERS = {}  # (id(processor), template) -> image placeholder text
_SPECIALS = {}  # (id(tokenizer), its size) -> special-token strings


def _chat(processor, messages, **kw):
    # subtle: transformers treats a variable the template does not read as a processor argument (and warns)
    template = processor.chat_template
    extra = {k: v for k, v in TEMPLATE_KWARGS.items() if isinstance(template, str) and k in template}
    return processor.apply_chat_template(messages, tokenize=False, **extra, **kw)


def image_placeholder(processor):
    """What the family's chat template writes for ONE image item, wrappers included, outer white
    space stripped: the difference between a user message with and without a leading image.
      llava-1.5: "<image>"   Qwen2.5-VL: "<|vision_start|><|image_pad|><|vision_end|>"
      InternVL: "<IMG_CONTEXT>"   Gemma 3: "<start_of_image>"   (the processor expands each one)
    Without a chat template: the processor's image token. A template whose image item does not
    contain the processor's image token is refused (nothing would mark the image)."""
    token = getattr(processor, "image_token", None) or MARKER
    template = getattr(processor, "chat_template", None)
    if not template:
        return token
    key = (id(processor), template)
    if key not in _PLACEHOLDERS:
        def render(content):
            return _chat(processor, [{"role": "user", "content": content}], add_generation_prompt=True)

        a, b = render([{"type": "text", "text": "Q"}]), render([{"type": "image"}, {"type": "text", "text": "Q"}])
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

    Each `<image>` becomes image_placeholder(processor), in place. subtle: llava-hf templates
    render a message's image items first and its text after, which would pull every image away
    from its `ImageK:` label. The question is therefore passed as ONE text item with the
    placeholders inline; the template only wraps it, e.g. for llava-1.5-7b-hf:
    `USER: Image1:<image>\\nIn Image1, what ...? ASSISTANT:`; for Qwen2.5-VL:
    `...<|im_start|>user\\nImage1:<|vision_start|><|image_pad|><|vision_end|>\\nIn Image1, ...`.
    """
    question = question.replace(MARKER, image_placeholder(processor))
    if not getattr(processor, "chat_template", None):
        return FALLBACK_TEMPLATE.format(question=question)
    msgs = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    return _chat(processor, msgs, add_generation_prompt=True)


def special_tokens(tokenizer):
    """The tokenizer's special-token strings (EOS, end-of-turn markers, ...), computed once per
    tokenizer: render_pair and with_stop ask for every row (Gemma's tokenizers have thousands)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _SPECIALS:
        found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        _SPECIALS[key] = frozenset(found | set(tokenizer.all_special_tokens))
    return _SPECIALS[key]


def render_pair(processor, question, answer):
    """-> (prompt_text, response_text): the generation prompt, and what the model must generate
    after it for this answer, as the template writes the answer turn.

    The answer turn is found in the full conversation (rendered with a stand-in answer), not by
    assuming the generation prompt is a prefix of it: LLaVA-OneVision's template opens a rendered
    answer turn with `assistant \\n` but prompts with `assistant\\n`; Gemma 4's prompt ends with an
    empty thought channel a rendered turn lacks. The response is the answer, preceded by what the
    conversation puts between the prompt and the answer when the prompt IS its prefix (llava-1.5:
    " "), and followed by the template's text up to and including its first special token (the
    end-of-turn token generation stops at: `<|im_end|>`, `<end_of_turn>`, `</s>`). A template that
    writes no end token (llava-1.5) gives the bare answer; build_inputs then appends EOS.
      llava-1.5 : ("USER: <image>\\nQ ASSISTANT:", " blue")
      Qwen2.5-VL: ("...<|im_start|>assistant\\n", "blue<|im_end|>")
    """
    prompt = render_prompt(processor, question)
    answer = answer.strip()
    if not getattr(processor, "chat_template", None):
        return prompt, " " + answer
    stand_in = "\u2063MIA-DPO-ANSWER\u2063"  # text no template rewrites
    msgs = [{"role": "user", "content": [{"type": "text", "text": question.replace(MARKER, image_placeholder(processor))}]},
            {"role": "assistant", "content": [{"type": "text", "text": stand_in}]}]
    full = _chat(processor, msgs)
    if full.count(stand_in) != 1:
        raise ValueError(f"{type(processor).__name__}: its chat template does not write the answer turn's text once")
    head, tail = full.split(stand_in)
    user_turn = prompt[: len(os.path.commonprefix([prompt, head]))]
    if question.split(MARKER)[-1].strip() not in user_turn:
        raise ValueError(f"{type(processor).__name__}: its chat template renders the question differently "
                         f"in a prompt and in a conversation")
    gap = head[len(prompt):] if head.startswith(prompt) else ""
    gap = gap if answer or gap.strip() else ""  # an empty answer: the model stopped at once (llava's " " is not said)
    ends = sorted((i, -len(s)) for s in special_tokens(processor.tokenizer) if (i := tail.find(s)) >= 0)
    tail = tail[: ends[0][0] - ends[0][1]] if ends else tail.rstrip()  # through the first (longest) one
    return prompt, gap + answer + tail


def with_stop(tokenizer, response):
    """A render_pair response as it is scored: + EOS unless it already ends with a special token
    (the template's end-of-turn token). llava-1.5: " blue" -> " blue</s>"; Qwen: "blue<|im_end|>" as is."""
    return response if any(response.endswith(s) for s in special_tokens(tokenizer)) else response + tokenizer.eos_token


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
    has_images = any(len(ims) for ims in images)
    enc = dict(processor(text=prompts, images=[list(ims) for ims in images] if has_images else None, padding=True,
                         padding_side="right" if answers is not None else padding_side, return_tensors="pt",
                         add_special_tokens=special))
    if answers is None:
        return enc
    responses = [render_pair(processor, q, a)[1] for q, a in zip(questions, answers)]
    responses = [with_stop(tok, r) if add_eos else r for r in responses]
    resp_ids = []
    for p, r in zip(prompts, responses):
        p_ids, f_ids = tok(p, add_special_tokens=special)["input_ids"], tok(p + r, add_special_tokens=special)["input_ids"]
        resp_ids.append(f_ids[len(p_ids):] if f_ids[: len(p_ids)] == p_ids else tok(r, add_special_tokens=False)["input_ids"])
    # re-lay every per-token tensor as [prompt | response | padding] (or padding first, on the left)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape == ids.shape and k != "input_ids"]
    lens = mask.sum(1).tolist()
    T = max(n + len(r) for n, r in zip(lens, resp_ids))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {"input_ids": torch.full((len(prompts), T), pad_id, dtype=ids.dtype),
           **{k: torch.zeros((len(prompts), T), dtype=enc[k].dtype) for k in per_token}}
    labels = torch.full((len(prompts), T), IGNORE_INDEX, dtype=ids.dtype)
    for i, (n, r) in enumerate(zip(lens, resp_ids)):
        m = n + len(r)
        at = slice(0, m) if padding_side == "right" else slice(T - m, T)
        r = torch.tensor(r, dtype=ids.dtype)
        out["input_ids"][i, at] = torch.cat([ids[i, :n], r])
        labels[i, at] = torch.cat([torch.full((n,), IGNORE_INDEX, dtype=ids.dtype), r])
        for k in per_token:  # the response is text: attended to (mask 1), of token type 0
            fill = torch.full((len(r),), 1 if k == "attention_mask" else 0, dtype=enc[k].dtype)
            out[k][i, at] = torch.cat([enc[k][i, :n], fill])
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


# ---------------------------------------------------------------------------------------------
# image-token geometry
# ---------------------------------------------------------------------------------------------
def image_token_boxes(processor, images):
    """-> one float64 numpy array (n_tokens, 4) per image: for each of that image's visual-token
    positions (the positions where input_ids == the model's image token id, in sequence order,
    i.e. the k-th image owns the next n_k such positions), the box (x0, y0, x1, y1) in ORIGINAL
    image pixels that the token sees; a row of NaN for a token that sees no pixels (LLaVA-NeXT /
    OneVision image_newline, any separator feature placed at an image-token position).
    A box may extend outside the image where the processor pads.

    `images` are the PIL images of ONE prompt (OneVision tiles an image only when it is alone).
    Every view the processor makes is followed with its own settings, size helpers and outputs
    (image_grid_thw, image_sizes, num_patches, rows/cols ...), in the order the model places
    the features; the row count is checked against what `processor(text=..., images=...)` emits.
      llava-1.5 (shortest edge 336, crop 336, patch 14), one 936x488 image -> [(576, 4)]; row 0 is
      (223.8, 0, 244.2, 20.3): resized to 644x336, 154 px cropped off the left, 14-px cells / 0.688.
    """
    name, ip_name = type(processor).__name__, type(processor.image_processor).__name__.removesuffix("Pil")
    ip_name = ip_name.removesuffix("Fast")
    handler = _GEOMETRY.get(name)
    if handler is None or ip_name not in handler[0]:
        raise ValueError(f"image_token_boxes: no geometry for {name} with {ip_name} (known: "
                         f"{', '.join(f'{k} + {v[0]}' for k, v in _GEOMETRY.items())})")
    images = list(images)
    # the processor's image kwargs, as its __call__ merges them; the image processor fills in the rest
    kwargs = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]
    kwargs.pop("return_tensors", None)
    out = processor.image_processor([images], **kwargs)
    ip = processor.image_processor
    settings = {k: _plain(kwargs[k] if k in kwargs else getattr(ip, k, None)) for k in ip.valid_kwargs.__annotations__}
    boxes = handler[1](processor, ip, settings, images, out)
    emitted = _emitted_image_tokens(processor, images)
    if [len(b) for b in boxes] != emitted:
        raise ValueError(f"image_token_boxes: {name} emits {emitted} image tokens for images of size "
                         f"{[im.size for im in images]}, the geometry gives {[len(b) for b in boxes]}")
    return boxes


def _plain(value):
    """A size setting (dict or SizeDict) -> a dict of its set keys; anything else unchanged."""
    from transformers.image_utils import SizeDict

    if isinstance(value, SizeDict):
        return {k: v for k, v in vars(value).items() if v is not None}
    return value


def _emitted_image_tokens(processor, images):
    """Image-token positions `processor(text=..., images=images)` gives each image (one prompt)."""
    tok = processor.tokenizer
    # subtle: Gemma 3's processor.image_token is <start_of_image>; the soft token the model fills is the tokenizer's
    soft = getattr(tok, "image_token", None)
    token_id = tok.convert_tokens_to_ids(soft) if soft else processor.image_token_id
    enc = processor(text=[processor.image_token * len(images)], images=[images], return_text_replacement_offsets=True)
    counts = [tok(span["replacement"], add_special_tokens=False)["input_ids"].count(token_id)
              for span in enc["text_replacement_offsets"][0]]
    if sum(counts) != list(enc["input_ids"][0]).count(token_id):
        raise ValueError(f"image_token_boxes: {type(processor).__name__}: image tokens outside the images' "
                         "replacements")
    return counts


class _View:
    """Where an original image lands in one processed view of h x w pixels:
    original (x, y) -> view (x * sx + ox, y * sy + oy).
      _View.of(936, 488).resize(336, 644).crop(0, 154, 336, 336) -> sx 0.688, sy 0.689, ox -154, oy 0"""

    def __init__(self, h, w, sx=1.0, sy=1.0, ox=0.0, oy=0.0):
        self.h, self.w, self.sx, self.sy, self.ox, self.oy = h, w, sx, sy, ox, oy

    @classmethod
    def of(cls, width, height):
        return cls(height, width)

    def resize(self, h, w):
        fy, fx = h / self.h, w / self.w
        return _View(h, w, self.sx * fx, self.sy * fy, self.ox * fx, self.oy * fy)

    def crop(self, top, left, h, w):
        """Keep rows top..top+h, columns left..left+w (negative top/left, or a larger h/w: padding)."""
        return _View(h, w, self.sx, self.sy, self.ox - left, self.oy - top)

    def grid(self, rows, cols):
        """(rows, cols, 4) original-pixel boxes of a rows x cols grid of equal cells over the view."""
        import numpy as np

        ys, xs = np.arange(rows + 1) * (self.h / rows), np.arange(cols + 1) * (self.w / cols)
        x0, y0 = (xs[:-1] - self.ox) / self.sx, (ys[:-1] - self.oy) / self.sy
        x1, y1 = (xs[1:] - self.ox) / self.sx, (ys[1:] - self.oy) / self.sy
        out = np.empty((rows, cols, 4))
        out[..., 0], out[..., 2] = x0[None, :], x1[None, :]
        out[..., 1], out[..., 3] = y0[:, None], y1[:, None]
        return out


def _resized_hw(ip, h, w, size):
    """(height, width) the image processor's own resize gives an h x w image for `size` (run on a
    1-channel zero image: the size rules live in resize, and differ per processor)."""
    import numpy as np
    from transformers.image_utils import SizeDict

    size = size if isinstance(size, SizeDict) else SizeDict(**size)
    return tuple(ip.resize(np.zeros((1, h, w), np.uint8), size=size, resample=0).shape[-2:])


def _center_crop(view, crop):
    """transformers' center_crop (zero-padding a side that is too small): top = (h - ch) // 2."""
    ch, cw = crop["height"], crop["width"]
    return view.crop((view.h - ch) // 2, (view.w - cw) // 2, ch, cw)


def _clip_like_view(ip, kwargs, view):
    """CLIP-style resize then centre crop, as CLIPImageProcessor / each LLaVA-NeXT patch does."""
    if kwargs.get("do_resize"):
        view = view.resize(*_resized_hw(ip, view.h, view.w, kwargs["size"]))
    if kwargs.get("do_center_crop"):
        view = _center_crop(view, kwargs["crop_size"])
    return view


def _check_no_cls(processor):
    """LLaVA-style patch grids only: a CLS token kept at an image-token position ('full' with
    num_additional_image_tokens) sees the whole view, which a box does not describe."""
    if processor.vision_feature_select_strategy != "default" and getattr(processor, "num_additional_image_tokens", 0):
        raise ValueError(f"image_token_boxes: {type(processor).__name__} keeps the CLS token (vision_feature_"
                         f"select_strategy {processor.vision_feature_select_strategy!r}): not supported")


def _boxes_llava(processor, ip, kwargs, images, out):
    """LLaVA-1.5: [pad to square, LlavaImageProcessor] -> resize -> centre crop -> patch grid."""
    _check_no_cls(processor)
    boxes, p = [], processor.patch_size
    for im in images:
        view = _View.of(*im.size)
        if kwargs.get("do_pad"):  # LlavaImageProcessor: centred square pad
            m = max(view.h, view.w)
            view = view.crop(-((m - view.h) // 2), -((m - view.w) // 2), m, m)
        view = _clip_like_view(ip, kwargs, view)
        gh, gw = view.h // p, view.w // p
        boxes.append(view.crop(0, 0, gh * p, gw * p).grid(gh, gw).reshape(-1, 4))
    return boxes


def _anyres_grid(ip, kwargs, image_size, tile, tile_tokens, tile_view):
    """LLaVA-NeXT / OneVision high-res part: best pinpoint, aspect-kept resize, centred pad, tiles
    row-major; -> (rows * tile_tokens, cols * tile_tokens, 4) boxes as the model lays them out
    (tile rows of token rows), before unpadding."""
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    H, W = image_size
    best = select_best_resolution((H, W), kwargs["image_grid_pinpoints"])
    nh, nw = get_patch_output_size(np.broadcast_to(np.uint8(0), (1, H, W)), best, input_data_format="channels_first")
    view = _View(H, W).resize(nh, nw)
    (top, _), (left, _) = ip._get_padding_size((nh, nw), best)
    view = view.crop(-top, -left, best[0], best[1])
    rows, cols = best[0] // tile, best[1] // tile
    grid = np.empty((rows * tile_tokens, cols * tile_tokens, 4))
    for r in range(rows):
        for c in range(cols):
            t = tile_view(view.crop(r * tile, c * tile, tile, tile))
            grid[r * tile_tokens:(r + 1) * tile_tokens, c * tile_tokens:(c + 1) * tile_tokens] = \
                t.grid(tile_tokens, tile_tokens)
    return grid


def _unpad_with_newlines(grid, image_size, max_tiles=None):
    """The model's unpad_image on the tile grid, OneVision's bilinear shrink past anyres_max_N
    (a shrunk token sees the union of the cells it mixes), then one image_newline (NaN) per row."""
    import math

    import numpy as np
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    grid = unpad_image(torch.from_numpy(grid).permute(2, 0, 1), list(image_size)).permute(1, 2, 0).numpy()
    if max_tiles is not None:
        h, w, tile_tokens_sq = grid.shape[0], grid.shape[1], max_tiles[1] ** 2
        ratio = math.sqrt(h * w / (max_tiles[0] * tile_tokens_sq))
        if ratio > 1.1:
            grid = _bilinear_union(grid, int(h // ratio), int(w // ratio))
    newline = np.full((grid.shape[0], 1, 4), np.nan)
    return np.concatenate([grid, newline], axis=1).reshape(-1, 4)


def _bilinear_union(grid, h, w):
    """(H, W, 4) boxes -> (h, w, 4): each output cell of interpolate(mode="bilinear") sees the union
    of the input cells it takes a non-zero weight from (found by interpolating one-hot rows)."""
    import numpy as np
    import torch

    def sources(n, m):  # (m, n) bool: input cells feeding each output cell
        eye = torch.eye(n, dtype=torch.float64)[None]  # (1, n, n): channel i is one-hot cell i
        return (torch.nn.functional.interpolate(eye, size=m, mode="linear")[0] > 0).T.numpy()

    ry, rx = sources(grid.shape[0], h), sources(grid.shape[1], w)
    out = np.empty((h, w, 4))
    for i in range(h):
        for j in range(w):
            cells = grid[ry[i]][:, rx[j]].reshape(-1, 4)
            out[i, j] = cells[:, 0].min(), cells[:, 1].min(), cells[:, 2].max(), cells[:, 3].max()
    return out


def _boxes_llava_next(processor, ip, kwargs, images, out):
    """LLaVA-NeXT: base view (squash to size, resize, crop) first, then the unpadded tile grid with
    a newline after each row."""
    import numpy as np

    _check_no_cls(processor)
    p, crop, size = processor.patch_size, kwargs["crop_size"], kwargs["size"]
    side_h, side_w = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile = crop["height"] if crop else side_h  # as the image processor picks its patch size
    boxes = []
    for im, (H, W) in zip(images, out["image_sizes"]):
        base = _clip_like_view(ip, kwargs, _View.of(*im.size).resize(side_h, side_w))
        n = base.h // p
        grid = _anyres_grid(ip, kwargs, (int(H), int(W)), tile, n, lambda v: _clip_like_view(ip, kwargs, v))
        boxes.append(np.concatenate([base.grid(n, n).reshape(-1, 4), _unpad_with_newlines(grid, (int(H), int(W)))]))
    return boxes


def _boxes_llava_onevision(processor, ip, kwargs, images, out):
    """LLaVA-OneVision: an image alone in its prompt -> base view + unpadded tile grid (shrunk past
    anyres_max_N) + newline per row; with other images -> centred pad to square, resize, and one
    newline after the grid."""
    import math

    import numpy as np

    if processor.vision_feature_select_strategy != "full":
        raise ValueError(f"image_token_boxes: {type(processor).__name__} with vision_feature_select_strategy "
                         f"{processor.vision_feature_select_strategy!r}: only 'full' is supported")
    n = math.isqrt(processor.num_image_tokens)
    size = kwargs["size"]
    side_h, side_w = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile_view = lambda v: _clip_like_view(ip, kwargs, v)  # noqa: E731
    nan = np.full((1, 4), np.nan)
    boxes = []
    for im, (H, W) in zip(images, out["image_sizes"]):
        view = _View.of(*im.size)
        if len(images) == 1:
            base = tile_view(view.resize(side_h, side_w))
            grid = _anyres_grid(ip, kwargs, (int(H), int(W)), side_h, n, tile_view)
            max_tiles = int(processor.vision_aspect_ratio.removeprefix("anyres_max_"))
            boxes.append(np.concatenate([base.grid(n, n).reshape(-1, 4),
                                         _unpad_with_newlines(grid, (int(H), int(W)), (max_tiles, n))]))
        else:
            m = max(view.h, view.w)
            view = tile_view(view.crop(-((m - view.h) // 2), -((m - view.w) // 2), m, m))
            boxes.append(np.concatenate([view.grid(n, n).reshape(-1, 4), nan]))
    return boxes


def _boxes_qwen(processor, ip, kwargs, images, out):
    """Qwen2/2.5/3-VL, Qwen3.5: smart_resize to image_grid_thw patches, merge_size^2 patches per token,
    row-major (Qwen2.5-VL's window order is undone inside the vision model)."""
    import numpy as np

    p, m = kwargs["patch_size"], kwargs["merge_size"]
    boxes = []
    for im, (t, gh, gw) in zip(images, out["image_grid_thw"].tolist()):
        view = _View.of(*im.size).resize(gh * p, gw * p)
        boxes.append(np.tile(view.grid(gh // m, gw // m).reshape(-1, 4), (t, 1)))
    return boxes


def _boxes_internvl(processor, ip, kwargs, images, out):
    """InternVL: get_optimal_tiled_canvas tiles row-major + a thumbnail last (when there are several
    tiles), each tile image_seq_length tokens after the pixel shuffle, row-major."""
    import math

    import numpy as np
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    size, n = kwargs["size"], math.isqrt(processor.image_seq_length)
    boxes = []
    for im, n_patches in zip(images, out["num_patches"]):
        view, tiles = _View.of(*im.size), []
        if kwargs.get("crop_to_patches") and kwargs["max_patches"] > 1:
            cols, rows = get_optimal_tiled_canvas((view.h, view.w), (size["height"], size["width"]),
                                                  kwargs["min_patches"], kwargs["max_patches"])
            canvas = view.resize(rows * size["height"], cols * size["width"])
            tiles = [canvas.crop(r * size["height"], c * size["width"], size["height"], size["width"])
                     for r in range(rows) for c in range(cols)]
        if len(tiles) != 1:  # the thumbnail, or the only view without tiling
            tiles.append(view.resize(size["height"], size["width"]))
        if len(tiles) != n_patches:
            raise ValueError(f"image_token_boxes: {type(ip).__name__} made {n_patches} tiles, "
                             f"the geometry {len(tiles)}")
        boxes.append(np.concatenate([t.grid(n, n).reshape(-1, 4) for t in tiles]))
    return boxes


def _boxes_gemma3(processor, ip, kwargs, images, out):
    """Gemma 3: squash to size, the patch grid average-pooled to sqrt(image_seq_length) per side."""
    import math

    if kwargs.get("do_pan_and_scan"):
        raise ValueError(f"image_token_boxes: {type(processor).__name__} with do_pan_and_scan: not supported")
    n, size = math.isqrt(processor.image_seq_length), kwargs["size"]
    return [_View.of(*im.size).resize(size["height"], size["width"]).grid(n, n).reshape(-1, 4) for im in images]


def _boxes_gemma4(processor, ip, kwargs, images, out):
    """Gemma 4: aspect-kept resize to a multiple of patch * pooling per side (read back from
    image_position_ids), pooled k x k, row-major; the padding slots are dropped by the model."""
    import numpy as np

    p, k = kwargs["patch_size"], kwargs["pooling_kernel_size"]
    boxes = []
    for im, pos in zip(images, out["image_position_ids"]):
        pw, ph = (int(v) + 1 for v in np.asarray(pos).max(axis=0))  # (x, y) patch indices; padding is -1
        view = _View.of(*im.size).resize(ph * p, pw * p)
        boxes.append(view.grid(ph // k, pw // k).reshape(-1, 4))
    return boxes


def _boxes_idefics3(processor, ip, kwargs, images, out):
    """Idefics3 / SmolVLM: resized to rows x cols tiles of max_image_size, tiles row-major then the
    global view (the whole image squashed to one tile), image_seq_len tokens each (pixel shuffle)."""
    import math

    import numpy as np

    tile, n = kwargs["max_image_size"]["longest_edge"], math.isqrt(processor.image_seq_len)
    boxes = []
    for im, rows, cols in zip(images, out["rows"][0], out["cols"][0]):
        view = _View.of(*im.size)
        canvas = view.resize(rows * tile, cols * tile)
        views = [canvas.crop(r * tile, c * tile, tile, tile) for r in range(rows) for c in range(cols)]
        views.append(view.resize(tile, tile))
        boxes.append(np.concatenate([v.grid(n, n).reshape(-1, 4) for v in views]))
    return boxes


_QWEN_IP = ("Qwen2VLImageProcessor",)
# processor class -> (image-processor classes it is known with, boxes function)
_GEOMETRY = {
    "LlavaProcessor": (("CLIPImageProcessor", "LlavaImageProcessor"), _boxes_llava),
    "LlavaNextProcessor": (("LlavaNextImageProcessor",), _boxes_llava_next),
    "LlavaOnevisionProcessor": (("LlavaOnevisionImageProcessor",), _boxes_llava_onevision),
    "Qwen2VLProcessor": (_QWEN_IP, _boxes_qwen),
    "Qwen2_5_VLProcessor": (_QWEN_IP, _boxes_qwen),
    "Qwen3VLProcessor": (_QWEN_IP, _boxes_qwen),
    "InternVLProcessor": (("GotOcr2ImageProcessor",), _boxes_internvl),
    "Gemma3Processor": (("Gemma3ImageProcessor",), _boxes_gemma3),
    "Gemma4Processor": (("Gemma4ImageProcessor",), _boxes_gemma4),
    "Idefics3Processor": (("Idefics3ImageProcessor",), _boxes_idefics3),
    "SmolVLMProcessor": (("SmolVLMImageProcessor",), _boxes_idefics3),
}
