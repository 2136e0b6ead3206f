"""
compose.py — what stages 01-03 share to turn single-image LLaVA samples into multi-image ones.

  sources : load_sources (read, validate, de-duplicate, --limit, check images; the stage's own
            parse rule says which rows it can use), Source, SkipRow, check_image
  turns   : clean_question / lower_first / source_turns (the question rewrite and the 512-
            character rule), labelled_turns ("In Image3, ..."), composite_turns (no boxes in
            composites)
  images  : build_pools / draw_companions (companions from the same sub-dataset), fit,
            file_name, save_jpeg (atomic), image_ref
  plumbing: run_parallel, plan_and_render (a companion that fails to decode is drawn again),
            resolve_paths, add_shared_args / add_source_flags, output_row, finish

The stages keep their own method: 01 the sequence, 02 the grid geometry, 03 the inset.
"""
from __future__ import annotations

import hashlib
import json
import argparse
import bisect
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from common import (MARKER, DataError, ImageError, ImageMissing, ImageOutside, Progress, add_image_flags, check_llava_row,
                    open_image, path_safe, read_rows, row_rng, write_jsonl, write_sidecar)

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



# ---------------------------------------------------------------------------------------------
# turns: a single-image row's questions and answers, rewritten for a multi-image prompt
# ---------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 512  # the authors skipped samples whose answer was >= 512 characters


# the question rewrite, shared by 01-03: a single-image turn -> its bare question -> `In ImageK, ...`
_LABEL_BEFORE = re.compile(r"Image\s*\d+\s*:\s*$", re.I)  # "Image3:" right before the marker
_IN_IMAGE = re.compile(r"^In\s+Image\s*\d+\s*,\s*", re.I)  # a leading "In Image3, "
_FIRST_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?")


def clean_question(text):
    """A human turn -> its bare question: `<image>`, an `ImageK:` label and `In ImageK, ` removed.

    "<image>\\nWhat is it?", "<image>What is it?", "What is it?\\n<image>", "What is it?<image>"
    and "Image3:<image>\\nIn Image3, what is it?" all -> "What is it?" / "what is it?".
    Text on both sides of the marker is kept, joined by a newline.
    """
    before, marker, after = text.partition(MARKER)
    if marker:
        before = _LABEL_BEFORE.sub("", before)
        text = "\n".join(s for s in (before.strip(), after.strip()) if s)
    return _IN_IMAGE.sub("", text.strip(), count=1)


def lower_first(text):
    """Lower-case the first letter of a question that will follow `In Image{k}, `.

    Rule: only when the text starts with a word (letters, at most one apostrophe part) that is
    plainly capitalised — first letter upper case, every other letter lower case — and is not
    the pronoun "I" ("I", "I'm", "I've", "I'd", "I'll"). Left alone: all-capital words ("OCR",
    "USA", "TV"), mixed case ("iPhone", "McDonald's", "eBay"), a word glued to digits ("A4"),
    and text starting with a digit, quote or bracket. Proper nouns cannot be told apart from
    sentence case without a tagger ("Paris is ..." -> "paris is ..."); questions rarely start so.
    "What is this?" -> "what is this?";  "A dog?" -> "a dog?";  "OCR the title." unchanged.
    """
    m = _FIRST_WORD.match(text)
    if not m or text[m.end():m.end() + 1].isalnum():
        return text
    word = m.group(0)
    if re.split("['\u2019]", word)[0] == "I" or not word[0].isupper() or word[1:] != word[1:].lower():
        return text
    return text[0].lower() + text[1:]


def source_turns(conv, image=None, max_answer_chars=MAX_ANSWER_CHARS):
    """A single-image row's LLaVA turns -> (questions, answers), questions cleaned; raises
    SkipRow(reason) for a row the formats cannot use. Pairs are (human, gpt); a trailing
    unanswered human turn is dropped. `image` (its path) is unused here; 02 and 03 check it."""
    n = conv[0]["value"].count(MARKER)
    if n == 0:
        raise SkipRow("no <image> in first human turn")
    if n > 1:
        raise SkipRow(f"several <image> in first human turn: {n}")
    if any(MARKER in t["value"] for t in conv[2::2]):
        raise SkipRow("<image> in a later human turn")
    pairs = list(zip(conv[0::2], conv[1::2]))
    questions = [clean_question(h["value"]) for h, _ in pairs]
    answers = [g["value"] for _, g in pairs]
    if not all(q.strip() for q in questions):
        raise SkipRow("empty question")
    if not all(a.strip() for a in answers):
        raise SkipRow("empty answer")
    if max_answer_chars and len(answers[0]) >= max_answer_chars:
        raise SkipRow(f"long answer: {len(answers[0])} chars")
    return questions, answers


def labelled_turns(questions, answers, prefixes, head):
    """Rebuild a conversation: human turn i = `{prefixes[i]}, {question}` (first letter lowered),
    with `head` (the image markers) in front of the first. -> LLaVA `conversations` list.
    """
    turns = []
    for i, (q, a, p) in enumerate(zip(questions, answers, prefixes)):
        turns.append({"from": "human", "value": (head if i == 0 else "") + f"{p}, {lower_first(q)}"})
        turns.append({"from": "gpt", "value": a})
    return turns


# companions: the images added to a sample, shared by 01-03
def draw_companions(rng, exclude, local, everyone, k):
    """k distinct images, none in `exclude`, uniform from `local` (a sorted list of paths) or,
    when it holds fewer than k others, from `everyone`. -> (paths, fell_back)."""
    for pool, fell_back in ((local, False), (everyone, True)):
        avail = len(pool) - sum(_contains(pool, p) for p in exclude)
        if avail >= k:
            out, seen = [], set(exclude)
            while len(out) < k:  # rejection: uniform without replacement, no O(pool) copy
                p = pool[rng.randrange(len(pool))]
                if p not in seen:
                    seen.add(p)
                    out.append(p)
            return out, fell_back
    raise SkipRow(f"too few images for companions: need {k}, pool holds {len(everyone)}")


def _contains(sorted_list, x):
    i = bisect.bisect_left(sorted_list, x)
    return i < len(sorted_list) and sorted_list[i] == x


def add_source_flags(group):
    """The source-row rules' flags, shared by 01-03."""
    group.add_argument("--max-answer-chars", type=int, default=MAX_ANSWER_CHARS,
                       help="skip rows whose first answer is this long or longer (0: no limit)")
    group.add_argument("--first-turn-only", action="store_true", help="keep only the first question/answer (default: all turns)")


_BOXES = re.compile(r"\[\s*-?\d*\.?\d+(?:\s*,\s*-?\d*\.?\d+){3}\s*\]")  # "[0.12, 0.3, 0.5, 0.77]"


def has_boxes(texts):
    """True if any text holds a bounding box like `[0.12, 0.3, 0.5, 0.77]` (meaningless in a collage)."""
    return any(_BOXES.search(t) for t in texts)


def composite_turns(conv, image, max_answer_chars, keep_boxes=False):
    """source_turns, plus the authors' rule for collages and insets (02 and 03): VG samples
    and samples whose text holds a bounding box are skipped, since coordinates of the source
    image mean nothing once it is pasted somewhere else."""
    qs, ans = source_turns(conv, image, max_answer_chars)
    if not keep_boxes and subset_of(image).lower() == "vg":
        raise SkipRow("VG sample")
    if not keep_boxes and has_boxes(qs + ans):
        raise SkipRow("bounding box in text")
    return qs, ans


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
    """None if `root/rel` is a usable image, else the skip reason. Default: the header, the size
    limit and PIL's format check (a truncated PNG fails; no pixels decoded); full=True decodes it."""
    try:
        open_image(root, rel, decode=full)
    except ImageMissing:
        return f"missing image: {rel}"
    except ImageOutside:
        return f"image outside --image-root: {rel} (--allow-outside-root reads it)"
    except ImageError as e:
        return f"unreadable image: {rel} ({str(e).split(': ', 1)[-1]})"
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


def plan_and_render(units, key, plan, render, pools, seed, workers=1, desc=None):
    """Plan every unit (a source, or a group of sources) with its own draws, render the plans over
    `workers` processes -> [(plan, rendered) or (None, SkipRow)] in unit order.

    `plan(unit, pools, rng)` -> a plan dict (or raises SkipRow); `render(plan)` -> (rendered,
    companion), where `companion` names a companion image that passed the check before use but
    fails to decode (a truncated JPEG does). Such an image leaves the pools and only the units
    that drew it are planned again, from draws of their own (row_rng(seed, "<key>:redraw<k>")):
    a bad companion never costs good rows, and the output stays independent of order and workers.
    """
    done, todo, bad = {}, list(range(len(units))), set()
    for k in range(len(units) + 1):  # each round removes at least one image: this ends
        if not todo:
            break
        plans = {}
        for i in todo:
            try:
                plans[i] = plan(units[i], pools, row_rng(seed, key(units[i]) if k == 0 else f"{key(units[i])}:redraw{k}"))
            except SkipRow as e:
                done[i] = (None, e)
        order = sorted(plans)
        todo = []
        for i, (rendered, companion) in zip(order, run_parallel(render, [plans[i] for i in order], workers, desc)):
            if companion is None:
                done[i] = (plans[i], rendered)
            else:
                bad.add(companion)
                todo.append(i)
        pools = {s: [p for p in ps if p not in bad] for s, ps in pools.items()}
    return [done[i] for i in range(len(units))]


def file_name(row_id, *parts):
    """A file name for an output image: the id made path-safe + a digest of what it shows, so a
    re-run with other settings never overwrites an image an older JSONL still points to."""
    safe = path_safe(row_id)
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
    """-> a copy of `args` with unset --data/--image-root/--out (and --image-out) filled: the toy
    world's paths when --data is unset, else --out beside --data. Refuses an --out that is --data."""
    a = argparse.Namespace(**vars(args))
    if a.data is None:
        a.data = TOY / f"{a.split}.json"
        if not a.data.is_file():
            sys.exit(f"{a.data} not found: build the toy data first with `python 00_make_toy.py`")
        a.image_root = a.image_root or TOY / "images"
        a.out = a.out or TOY / (f"{name}.jsonl" if a.split == "train" else f"{name}-{a.split}.jsonl")
    if a.image_root is None:
        sys.exit("--image-root is required with --data (the folder the rows' image paths are relative to)")
    a.out = a.out or Path(a.data).with_name(f"{Path(a.data).stem}-{name}.jsonl")
    if Path(a.out).resolve() == Path(a.data).resolve():
        sys.exit("--out would overwrite --data; inputs are never modified")
    if image_dir is not None and getattr(a, "image_out", None) is None:
        a.image_out = Path(a.image_root) / image_dir
    if image_dir is not None and not a.allow_outside_root and not Path(a.image_out).resolve().is_relative_to(
            Path(a.image_root).resolve()):
        sys.exit(f"--image-out {a.image_out} is outside --image-root {a.image_root}: the rows would name images "
                 "outside the root, which later stages refuse; add --allow-outside-root here and there to mean it")
    return a

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
                   help="image check before use: header, size and the format's own check without decoding "
                        "(fast; catches truncated PNGs), or decode fully (catches every broken file)")
    add_image_flags(s)
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
