"""
01_make_sequence.py — stage 1: single-image samples -> multi-image *sequence* samples.
in : LLaVA-format JSON list or JSONL + image root      out: JSONL (+ .meta.json sidecar)

  python 01_make_sequence.py                      # toy: data/toy/train.json -> data/toy/sequence.jsonl
  python 01_make_sequence.py --split heldout      # toy: data/toy/heldout.json -> data/toy/sequence-heldout.jsonl
  python 01_make_sequence.py --data llava_v1_5_mix665k.json --image-root /data/llava \\
      --out data/sequence.jsonl --workers 8

Each usable source row gets N-1 companion images (N in 2..5, drawn per row from --counts; the
default mix is the authors': 55% 2, 16% 3, 16% 4, 13% 5), uniformly from the row's sub-dataset
(first path component) and never its own image; the N paths are shuffled and the target's
position k (1-based) recorded. When the sub-dataset holds too few other images the companions
come from the whole pool instead (counted as `companions_fallback`). Prompts:
  first human turn   Image1:<image>\\nImage2:<image>\\n...ImageN:<image>\\nIn Image{k}, {question}
  later human turns  In Image{k}, {question}
The source question loses its `<image>` marker (before or after the text, with or without the
newline) and any multi-image labelling it already had (`Image3:` before the marker, a leading
`In Image3, `), so toy prompts like `Image3:<image>\\nIn Image3, what ...?` are relabelled, not
labelled twice. Its first letter is lower-cased by `lower_first` (rule in its docstring).

Output rows: `id` = "seq-<source id>", `image` = the N paths (as in the source, i.e. relative to
the image root), `conversations`, the source row's other top-level fields unchanged (the toy's
`toy`), and `mia` = {format, n_images, target, sources, source_images, companions,
companions_fallback}. Rows are sorted by id, so the file is byte-identical for any --workers and
any order of the input rows: every random choice for a row comes from row_rng(seed, id) (draws
in order: count, companions, shuffle) and companion pools are sorted sets of the usable rows'
image paths. --limit N takes a seeded random subset of N rows, also independent of the order.

Skipped rows (counted by reason in the sidecar and the summary line): text-only or multi-image
rows, missing or unreadable images, no / several `<image>` in the first human turn, `<image>` in
a later turn, an empty question or answer, a first answer of >= --max-answer-chars, duplicate
ids (the smallest row in canonical JSON is kept, so the choice does not depend on order).
A malformed line or row stops the run naming file and line, unless --on-error skip.

Recipes (flags left unset): `toy` (the toy world's data) takes a 4000-row subset with equal
shares of 2-5 images (the toy's dev split chose it: README); `paper` takes every row with the
authors' mix. `--recipe auto` picks toy for files 00_make_toy.py wrote, paper for any other.

The question rewrite and the companion draw are shared by 01-03 and live in compose.py;
reading, checking and writing rows (the plumbing every stage shares) is in common.py.
"""
import argparse
import time

import common
from common import MARKER, Skips, row_rng
from compose import (SkipRow, add_shared_args, add_source_flags, build_pools, draw_companions, finish, labelled_turns,
                     load_sources, output_row, parse_counts, resolve_paths, source_turns)

# ---- method: what the paper specifies (edit me) ----
COUNTS = "2:0.55,3:0.16,4:0.16,5:0.13"  # the authors' mix of 62k sequence samples
RECIPES = {"toy": {"limit": 4000, "counts": "2:1,3:1,4:1,5:1"}, "paper": {"limit": 0, "counts": COUNTS}}
def sequence_head(n):
    """`Image1:<image>\\nImage2:<image>\\n` for n = 2: each label right before its image."""
    return "".join(f"Image{i}:{MARKER}\n" for i in range(1, n + 1))


def make_sequence(src, pools, weights, rng, same_subset=True, first_turn_only=False):
    """One source -> (output row, fell_back). rng draws, in order: count, companions, shuffle."""
    n = rng.choices(list(weights), weights=list(weights.values()))[0]
    local = pools.get(src.subset, []) if same_subset else pools[None]
    companions, fell_back = draw_companions(rng, {src.image}, local, pools[None], n - 1)
    images = [src.image] + companions
    rng.shuffle(images)
    k = images.index(src.image) + 1
    qs, ans = (src.questions[:1], src.answers[:1]) if first_turn_only else (src.questions, src.answers)
    turns = labelled_turns(qs, ans, [f"In Image{k}"] * len(qs), sequence_head(n))
    mia = {"format": "sequence", "n_images": n, "target": k, "sources": [src.id], "source_images": [src.image],
           "companions": [p for p in images if p != src.image], "companions_fallback": fell_back}
    return output_row(f"seq-{src.id}", images, turns, src.row, mia), fell_back


# ---- plumbing ----
def main(args):
    t0 = time.time()
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    try:
        weights = parse_counts(args.counts, allowed={2, 3, 4, 5})
    except ValueError as e:
        raise SystemExit(f"01_make_sequence: --counts: {e}") from None
    skips = Skips()
    sources, n_read = load_sources(args, skips, lambda conv, image: source_turns(conv, image, args.max_answer_chars))
    pools = build_pools(sources)
    rows, n_fallback = [], 0
    for src in sources:
        try:
            row, fell_back = make_sequence(src, pools, weights, row_rng(args.seed, src.id),
                                           args.companions == "subset", args.first_turn_only)
        except SkipRow as e:
            skips.add(src.id, str(e), args.data, src.line)
            continue
        rows.append(row)
        n_fallback += fell_back
    n_images = {}
    for r in rows:
        n_images[r["mia"]["n_images"]] = n_images.get(r["mia"]["n_images"], 0) + 1
    counts = {"rows_read": n_read, "rows_written": len(rows), "companions_fallback": n_fallback,
              "n_images": dict(sorted(n_images.items()))}
    finish("01_make_sequence", args, rows, skips, counts, t0)
    return rows, skips, counts


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    m = add_shared_args(p)
    add_source_flags(m)
    m.add_argument("--counts", help=f"images per prompt with weights, drawn per row (N or N:w,...; N in 2-5); "
                   f"toy: equal shares, paper: the authors' {COUNTS}")
    m.add_argument("--companions", choices=("subset", "any"), default="subset",
                   help="draw companions from the row's sub-dataset (paper) or from all images")
    args = p.parse_args(argv)
    return resolve_paths(common.apply_recipe(args, RECIPES, common.is_toy_data(args.data), "01_make_sequence"), "sequence")


if __name__ == "__main__":
    common.run_stage(main, get_args)
