"""
common.py — the data contract between the MIA-DPO stages (no method logic, no model code here).

  rows    : read_rows (LLaVA JSON list or JSONL; errors name file:line: field), check_llava_row,
            check_pair_row (the fields 05 and 06 read), Skips (what was passed over, and why), row_rng
  writes  : atomic_write / write_jsonl / atomic_dir (temp file or folder, then rename), write_sidecar (script, args,
            counts, skips beside every output)
  answers : normalise_answer (one rule for "the same answer" in 04, 05 and 07), mc_prompt (how a
            multiple-choice row is asked: 07_eval.py and the harness model classes)
  loops   : Progress (a bar on a terminal, a line every 30 s in a log), ResumeFile (resumable JSONL)
  recipes : apply_recipe (unset flags from the toy or the paper recipe), is_toy_model / is_toy_data
  system  : run_stage (bad input ends a run with one located line), shared flags, set_threads
  images  : load_image / open_image (EXIF orientation, any mode -> RGB; every failure, a
            too large image included, an ImageError naming the path)

Talking to a model lives in vlm.py, where the visual tokens sit in token_geometry.py, and what
01-03 share to build multi-image rows in compose.py. Nothing here imports torch or transformers,
so stages that only move data (01-03, 05) start in a fraction of a second.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import string
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path



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
    Why not jsonlines' Reader (the writer below uses jsonlines): LLaVA-665k ships as one JSON
    list, not JSONL, and every good row needs its line for later errors, which the Reader does
    not hand out; one reader for both shapes keeps the messages alike.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    if data.lstrip().startswith(b"["):  # a JSON list, as LLaVA-665k is shipped
        text = _decode(path, data, 0)  # a list cannot be read past a bad byte: always an error
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:  # ... nor past a syntax error
            raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        starts = _object_start_lines(text, len(rows))
        for i, row in enumerate(rows):
            line = starts[i] if starts else i + 1
            if not isinstance(row, dict):
                _bad(path, line, None, f"item {i} is {type(row).__name__}, not an object", on_error, skips)
                continue
            yield line, row
        return
    # subtle: split on b"\n" only; str.splitlines would also split inside a row holding U+2028 or
    # U+0085, which json.dumps(ensure_ascii=False) writes unescaped
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(_decode(path, raw, line))
        except DataError as e:
            _bad(path, line, None, e.msg, on_error, skips)
            continue
        except json.JSONDecodeError as e:
            _bad(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})", on_error, skips)
            continue
        if not isinstance(row, dict):
            _bad(path, line, None, f"a {type(row).__name__}, not an object", on_error, skips)
            continue
        yield line, row


def _decode(path, data, line):
    """UTF-8 bytes -> str; a bad byte is a DataError naming its line (counted from `line`, 0 for a
    whole file) and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        at = (line or 1) + data.count(b"\n", 0, e.start)
        raise DataError(path, at, None, f"not UTF-8: byte 0x{data[e.start]:02x} at column {e.start - start + 1} "
                                        "(save the file as UTF-8)") from None


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


def path_safe(text, limit=150):
    """`text` with every character but letters, digits, '.', '_' and '-' replaced by '_', cut to `limit`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:limit]


def safe_name(text, limit=150):
    """A file name (no folder) for a row id: kept as it is when already safe, else its unsafe
    characters replaced and a digest of the id added, so ids that differ never share a file and
    no id ("../../x", "/tmp/x") can place a file outside the output folder.
      safe_name("seq-12") -> "seq-12";  safe_name("../a b") -> ".._a_b-<10 hex digits>"
    """
    import hashlib

    safe = path_safe(text, limit)
    if safe == str(text) and safe.strip(".") and not safe.startswith("."):
        return safe
    return f"{safe}-{hashlib.sha1(str(text).encode()).hexdigest()[:10]}"


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


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary folder beside `path` to fill; on success it replaces `path` (a saved
    model, a checkpoint), on an exception it is removed and any previous `path` stays as it was."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write_jsonl(path, rows):
    """Write rows as JSONL (one `json.dumps(row, ensure_ascii=False)` a line, via jsonlines),
    atomically; returns the number written."""
    import jsonlines

    n = 0
    with atomic_write(path) as f, jsonlines.Writer(f) as out:
        for row in rows:
            out.write(row)
            n += 1
    return n


_HELD = {}  # output path -> (open lock file, its path): held until released or the process ends


def hold_output(out):
    """Hold `out` (a file or folder a stage writes) for the rest of this process: a second process
    given the same output stops at once with a message, instead of both doing all the work and
    overwriting each other. An OS lock (flock) on a small file beside it, released when the process
    ends however it ends, so a killed run leaves nothing to clean up."""
    import atexit
    import fcntl

    out = Path(out)
    if str(out) in _HELD:  # this process holds it already (a stage's main called twice, as tests do)
        return
    lock = out / ".lock" if out.is_dir() else out.with_name(f".{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise SystemExit(f"{out}: another process is writing it ({holder}, lock {lock}); wait for it to end or "
                         "choose another output") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _HELD[str(out)] = (f, lock)
    atexit.register(release_output, out)  # the lock file goes too (the OS lock goes with the process anyway)


def release_output(out):
    f, lock = _HELD.pop(str(Path(out)), (None, None))
    if f is not None:
        lock.unlink(missing_ok=True)
        f.close()


@contextlib.contextmanager
def output_lock(out):
    """hold_output(out) for the block only."""
    held = str(Path(out)) in _HELD  # held already: this block does not release it
    hold_output(out)
    try:
        yield
    finally:
        if not held:
            release_output(out)


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


def mc_prompt(question, n_images, options):
    """How a multiple-choice row is asked: LLaVA-1.5's wording as VLMEvalKit's LLaVA class builds it
    (open-compass/VLMEvalKit, vlmeval/vlm/llava/llava.py, build_prompt): the question, one `A. option`
    line per option, then "Answer with the option's letter from the given choices directly.". Images
    go first, one `<image>` each, unless the question already places them.
    mc_prompt("Same?", 2, ["yes", "no"]) -> "<image>\\n<image>\\nSame?\\nA. yes\\nB. no\\nAnswer with ..."."""
    head = "" if MARKER in question else "<image>\n" * n_images
    opts = "".join(f"\n{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))
    return f"{head}{question}{opts}\nAnswer with the option's letter from the given choices directly."


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
    """-> a copy of the parsed `args` with every flag left unset (None) taken from a named recipe:
    args.recipe "toy" or "paper", or "auto" = "toy" when the stage's input is the toy world (`toy`),
    else "paper" — so a real checkpoint never silently gets the toy's settings. Explicit flags
    always win. Prints which recipe and values were used; `recipe` (the name) and `recipe_values`
    (what it filled) land in the sidecar. Stages call it in get_args, so main reads final flags."""
    name = args.recipe if args.recipe != "auto" else ("toy" if toy else "paper")
    filled = {k: v for k, v in recipes[name].items() if getattr(args, k) is None}
    how = "--recipe" if args.recipe != "auto" else f"auto: {why or ('toy input' if toy else 'not the toy world')}"
    flag = lambda k, v: f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}"  # noqa: E731
    shown = " ".join(flag(k.replace("_", "-"), v) for k, v in filled.items())
    if not quiet:
        print(f"{stage}: recipe {name} ({how}){': ' + shown if shown else ''}", flush=True)
    return argparse.Namespace(**{**vars(args), **filled, "recipe": name, "recipe_values": filled})


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
    """An image that is missing, too large or cannot be decoded; the message names the path."""


class ImageMissing(ImageError):
    """No file at the image's path."""


class ImageOutside(ImageError):
    """A path that leads outside --image-root ("../x.png", "/etc/x.png") without --allow-outside-root."""


IMAGE_POLICY = {"max_pixels": 50_000_000, "outside_root": False}  # set once per run by set_image_policy


def set_image_policy(max_pixels=50_000_000, outside_root=False):
    """The run's image flags (add_image_flags), for every open_image of this process.
    --max-image-pixels: refuse images of more than N pixels before decoding them (0: no limit). A
    20000x20000 PNG is 1.2 GB decoded; 50 MP (8660x5773) is far above any instruction-tuning image.
    PIL's own decompression-bomb limit follows, so it never refuses first.
    --allow-outside-root: read paths that lead outside --image-root (absolute, or through "..");
    by default such a row is refused, so a row cannot make a stage read any file on the machine."""
    from PIL import Image

    IMAGE_POLICY.update(max_pixels=max_pixels, outside_root=outside_root)
    Image.MAX_IMAGE_PIXELS = max_pixels or None


def add_image_flags(group):
    group.add_argument("--max-image-pixels", type=int, default=IMAGE_POLICY["max_pixels"], metavar="N",
                       help="refuse (or with --on-error skip, count and skip) images of more than N pixels, "
                            "before decoding them (0: no limit)")
    group.add_argument("--allow-outside-root", action="store_true",
                       help="read image paths that lead outside --image-root (absolute, or through ..); refused by default")


def image_path(root, rel):
    """root/rel, checked: a path leading outside `root` raises ImageOutside unless --allow-outside-root.
    Lexical (symlinks inside the root that point elsewhere are fine, as datasets often use them)."""
    if root is None:
        return Path(rel)
    path = Path(rel) if os.path.isabs(rel) else Path(root) / rel
    inside = os.path.normpath(path) == os.path.normpath(root) or os.path.normpath(path).startswith(
        os.path.join(os.path.normpath(root), ""))
    if not inside and not IMAGE_POLICY["outside_root"]:
        raise ImageOutside(f"{rel}: image path outside --image-root {root} (--allow-outside-root reads it)")
    return path


def open_image(root, rel, decode=True):
    """Open `root/rel` -> an RGB PIL image, EXIF orientation applied (decode=False: only check it
    -> its (width, height), reading the whole file but decoding no pixels where PIL can verify
    the format: a truncated PNG fails here).

    Modes: RGBA/LA/transparent palette are composited on white (LLaVA's `.convert("RGB")` would
    show whatever colour hides under transparent pixels, often black); CMYK, P, L, 1, 16-bit and
    float grayscale are converted. Every failure is an ImageError naming the path: missing, empty,
    larger than --max-image-pixels, or whatever PIL raises on a bad file (OSError, ValueError,
    SyntaxError, DecompressionBombError, struct.error, ...: a decoder meeting a hostile file
    raises many kinds, and one bad image must never stop a run that skips bad rows).
    """
    import warnings

    from PIL import Image, ImageOps

    path = image_path(root, rel)
    if not path.is_file():
        raise ImageMissing(f"{path}: image not found")
    limit = IMAGE_POLICY["max_pixels"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise ImageError(f"{path}: empty image ({w}x{h})")
                if limit and w * h > limit:
                    raise ImageError(f"{path}: image too large: {w}x{h} = {w * h / 1e6:.0f} MP > "
                                     f"--max-image-pixels {limit}")
                if not decode:
                    im.verify()
                    return w, h
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large ({e})") from None
    except Exception as e:  # noqa: BLE001  (see the docstring)
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_image(root, rel):
    """`root/rel` as an RGB PIL image (open_image); raises ImageError naming the path."""
    return open_image(root, rel)


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
