"""
02_make_grid.py — stage 2: single-image samples -> grid-collage samples (2-9 images in ONE image).
in : LLaVA-format JSON list or JSONL + image root     out: JSONL + collage JPEGs (+ .meta.json sidecar)

  python 02_make_grid.py                      # toy: data/toy/train.json -> data/toy/grid.jsonl + data/toy/images/mia_grid/
  python 02_make_grid.py --data llava_v1_5_mix665k.json --image-root /data/llava \\
      --out data/grid.jsonl --workers 8       # collages go to /data/llava/mia_grid/

Each usable source is pasted with companions into one collage of N = 2, 3, 4, 6 or 9 cells
(1x2, 1x3, 2x2, 2x3, 3x3; N drawn per row from --counts, default about a third 2-image, the
rest spread over 3/4/6/9, like the authors' set). Companions: uniform from all usable images
(the authors' choice; --companions subset for the row's sub-dataset), never a source's own
image. Geometry (the authors' released code): 448x448 cells, 40 px between cells and a 40 px strip above each row
holding the label `Image{n}` (row-major from 1), black, size 36, at x = cell_x + 20. Canvas:
2 -> 936x488, 3 -> 1424x488, 4 -> 936x976, 6 -> 1424x976, 9 -> 1424x1464.
Our choices (the authors left them open): each image is resized to fit its cell keeping the
aspect ratio (LANCZOS, also upwards) and centred on white; the label's y centres its glyphs in
the strip (drawn at the authors' y = cell_y - 40, the "g" of this font would dip 3 px into the
cell); the font is Pillow's bundled default (DejaVu-derived, FreeType) at size 36.

Prompt: `<image>\\nIn Image{k}, {question, first letter lower-cased}`; later turns `In Image{k}, ...`
(question cleaning, lower-casing rule and companion draw: compose.py, shared by 01-03). VG samples and samples whose
text holds a bounding box `[x0, y0, x1, y1]` are skipped unless --keep-boxes. With --merge P a
fraction P of collages holds 2-3 source samples, each with its own `In Image{k_i}, ` turns
(ids joined with `_`); the first source is the collage's `target`.

Output rows: id "grid-<source id(s)>", image [<image-out relative to image-root>/<name>.jpg],
conversations, the (first) source's other top-level fields, and `mia` = {format, n_images,
layout [rows, cols], target, targets, sources, source_images, companions, cell_images,
size [W, H], cells [[x0, y0, x1, y1]] (every cell, row-major), pasted [[...]] (the image inside
each cell), companions_fallback}. Rows sorted by id: byte-identical for any --workers and input
order. Images are written (atomically) before the JSONL that references them; a collage's file
name carries a digest of its content plan, so a re-run never changes an image an older JSONL
points to. Skips as in 01, plus "unreadable companion" when a companion passed the header check
but fails to decode (use --verify full to catch those up front).
Recipes (flags left unset): `toy` takes a 1000-row subset of the toy world's data, `paper` every
row; `--recipe auto` picks toy for files 00_make_toy.py wrote.
"""
import argparse
import functools
import time
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import common
import compose
from common import ImageError, Skips, load_image, row_rng



# ---- method: what the paper specifies (edit me) ----
CELL, GAP = 448, 40  # cell side; gap between cells = height of the label strip above each row
LAYOUTS = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}  # n -> (rows, cols)
COUNTS = "2:0.34,3:0.165,4:0.165,6:0.165,9:0.165"
LABEL_X, FONT_SIZE = 20, 36
RECIPES = {"toy": {"limit": 1000}, "paper": {"limit": 0}}
def grid_geometry(n, cell=CELL, gap=GAP):
    """n images -> (canvas (W, H), cell boxes [(x0, y0, x1, y1)] row-major).

    Cell (i, j) starts at x = j * (cell + gap), y = i * (cell + gap) + gap.
    grid_geometry(2) -> ((936, 488), [(0, 40, 448, 488), (488, 40, 936, 488)])
    """
    rows, cols = LAYOUTS[n]
    size = (cols * cell + (cols - 1) * gap, rows * (cell + gap))
    cells = [(j * (cell + gap), i * (cell + gap) + gap, j * (cell + gap) + cell, i * (cell + gap) + gap + cell)
             for i in range(rows) for j in range(cols)]
    return size, cells


def paste_box(image_size, cell_box):
    """Where an image of `image_size` lands in `cell_box`: fitted, aspect kept, centred."""
    x0, y0, x1, y1 = cell_box
    w, h = compose.fit(*image_size, x1 - x0, y1 - y0)
    x, y = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
    return x, y, x + w, y + h


def label_xy(cell_box, glyph_box, gap=GAP):
    """Label origin: x = cell_x + 20; y centres the glyphs (`font.getbbox(text)`) in the strip."""
    x0, y0 = cell_box[:2]
    top, bottom = glyph_box[1], glyph_box[3]
    return x0 + LABEL_X, y0 - gap + (gap - (bottom - top)) // 2 - top


def compose_grid(images, font):
    """n PIL RGB images (n in LAYOUTS) -> (collage, pasted boxes). Labels `Image1..n` row-major."""
    size, cells = grid_geometry(len(images))
    canvas = Image.new("RGB", size, "white")
    pasted = []
    for n, (im, cell) in enumerate(zip(images, cells), 1):
        box = paste_box(im.size, cell)
        w, h = box[2] - box[0], box[3] - box[1]
        canvas.paste(im if im.size == (w, h) else im.resize((w, h), Image.LANCZOS), box[:2])
        pasted.append(box)
        mask, glyphs = _label(f"Image{n}", font)
        x, y = label_xy(cell, glyphs)
        canvas.paste((0, 0, 0), (x + glyphs[0], y + glyphs[1]), mask)  # = draw.text(..., fill="black")
    return canvas, pasted


@functools.lru_cache(maxsize=64)
def _label(text, font):
    """(anti-aliased mask, glyph box) of a label, rendered once per process: pasting the cached
    mask in black is what `draw.text` does, at a fraction of the cost."""
    glyphs = font.getbbox(text)
    mask = Image.new("L", (glyphs[2] - glyphs[0], glyphs[3] - glyphs[1]), 0)
    ImageDraw.Draw(mask).text((-glyphs[0], -glyphs[1]), text, fill=255, font=font)
    return mask, glyphs


def group_sources(ids, images, merge, seed, max_group=3):
    """Which sources share a collage -> list of index groups (first index = the lead).

    merge = 0: every source alone. Otherwise sources are visited in a seeded order (a
    row_rng(seed, "merge:id") draw each, so the order depends on the input set, not its order);
    a still-free source, with probability `merge`, takes the next 1 or 2 free sources whose
    images differ from the group's as partners.
    """
    if merge <= 0 or max_group < 2:
        return [[i] for i in range(len(ids))]
    rngs = [row_rng(seed, f"merge:{i}") for i in ids]
    keys = [r.random() for r in rngs]
    order = sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))
    used, groups = [False] * len(ids), []
    for pos, i in enumerate(order):
        if used[i]:
            continue
        used[i], group = True, [i]
        size = rngs[i].choice(range(2, max_group + 1)) if rngs[i].random() < merge else 1
        for j in order[pos + 1:]:
            if len(group) >= size:
                break
            if not used[j] and images[j] not in {images[g] for g in group}:
                used[j] = True
                group.append(j)
        groups.append(group)
    return groups


def plan_grid(srcs, pools, weights, rng, same_subset=False, first_turn_only=False):
    """1-3 sources -> collage plan (cells, targets, conversation). rng draws, in order: the
    count (among counts >= len(srcs)), companions, the shuffle of the cells."""
    allowed = {n: w for n, w in weights.items() if n >= len(srcs) and w > 0}
    n = rng.choices(list(allowed), weights=list(allowed.values()))[0]
    own = [s.image for s in srcs]
    local = pools.get(srcs[0].subset, []) if same_subset else pools[None]
    companions, fell_back = compose.draw_companions(rng, set(own), local, pools[None], n - len(srcs))
    cells = own + companions
    rng.shuffle(cells)
    targets = [cells.index(p) + 1 for p in own]
    turns = []
    for s, k in zip(srcs, targets):
        qs, ans = (s.questions[:1], s.answers[:1]) if first_turn_only else (s.questions, s.answers)
        turns += compose.labelled_turns(qs, ans, [f"In Image{k}"] * len(qs), "" if turns else common.MARKER + "\n")
    return {"id": "grid-" + "_".join(s.id for s in srcs), "n": n, "cells": cells, "targets": targets,
            "sources": [s.id for s in srcs], "source_images": own, "turns": turns, "fell_back": fell_back}


# ---- plumbing ----
_FONT = None


def get_font():
    """Pillow's bundled scalable default font (Pillow >= 10.1 with FreeType), once per process."""
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=FONT_SIZE)
        if not isinstance(_FONT, ImageFont.FreeTypeFont):
            raise RuntimeError("this Pillow has no FreeType: the size-36 label font needs Pillow >= 10.1 with FreeType")
    return _FONT


def render(item, image_root, image_out, quality):
    """Worker: load the cell images, compose, save -> ((pasted boxes, None) or (None, skip reason),
    the companion that failed to decode or None)."""
    images = []
    for p in item["cells"]:
        try:
            images.append(load_image(image_root, p))
        except ImageError as e:
            if p in item["source_images"]:
                return (None, f"unreadable image: {e}"), None
            return None, p  # drawn again by plan_and_render
    canvas, pasted = compose_grid(images, get_font())
    compose.save_jpeg(canvas, Path(image_out) / item["file"], quality)
    return (pasted, None), None


def main(args):
    t0 = time.time()
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    weights = compose.parse_counts(args.counts, allowed=set(LAYOUTS))
    get_font()  # fail before any work if the font cannot render
    skips = Skips()
    sources, n_read = compose.load_sources(args, skips, partial(compose.composite_turns, max_answer_chars=args.max_answer_chars,
                                                                keep_boxes=args.keep_boxes))
    max_group = min(3, max(n for n, w in weights.items() if w > 0))
    groups = [[sources[i] for i in g] for g in group_sources([s.id for s in sources], [s.image for s in sources],
                                                             args.merge, args.seed, max_group)]

    def plan(srcs, pools, rng):
        item = plan_grid(srcs, pools, weights, rng, args.companions == "subset", args.first_turn_only)
        return {**item, "file": compose.file_name(item["id"], item["cells"], args.jpeg_quality, CELL, GAP) + ".jpg"}

    Path(args.image_out).mkdir(parents=True, exist_ok=True)
    done = compose.plan_and_render(groups, lambda srcs: "_".join(s.id for s in srcs), plan,
                                   partial(render, image_root=args.image_root, image_out=args.image_out,
                                           quality=args.jpeg_quality), compose.build_pools(sources), args.seed,
                                   args.workers, "collages")
    ref = compose.image_ref(args.image_out, args.image_root)
    rows, n_fallback, n_images = [], 0, {}
    for srcs, (item, out) in zip(groups, done):
        pasted, err = (None, str(out)) if item is None else out
        if err:
            for s in srcs:
                skips.add(s.id, err, args.data, s.line)
            continue
        size, cells = grid_geometry(item["n"])
        mia = {"format": "grid", "n_images": item["n"], "layout": list(LAYOUTS[item["n"]]), "target": item["targets"][0],
               "targets": item["targets"], "sources": item["sources"], "source_images": item["source_images"],
               "companions": [p for p in item["cells"] if p not in item["source_images"]],
               "cell_images": item["cells"], "size": list(size), "cells": [list(c) for c in cells],
               "pasted": [list(b) for b in pasted], "companions_fallback": item["fell_back"]}
        rows.append(compose.output_row(item["id"], [f"{ref}/{item['file']}"], item["turns"], srcs[0].row, mia))
        n_fallback += item["fell_back"]
        n_images[item["n"]] = n_images.get(item["n"], 0) + 1
    counts = {"rows_read": n_read, "rows_written": len(rows), "sources_used": sum(len(r["mia"]["sources"]) for r in rows),
              "companions_fallback": n_fallback, "n_images": dict(sorted(n_images.items()))}
    compose.finish("02_make_grid", args, rows, skips, counts, t0)
    return rows, skips, counts


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    m = compose.add_shared_args(p, image_out="mia_grid")
    compose.add_source_flags(m)
    m.add_argument("--counts", default=COUNTS, help="images per collage with weights, drawn per row (N or N:w,...; N in 2,3,4,6,9)")
    m.add_argument("--companions", choices=("subset", "any"), default="any",
                   help="draw companions from all images (authors) or from the row's sub-dataset")
    m.add_argument("--merge", type=float, default=0.0, help="fraction of collages that hold 2-3 source samples")
    m.add_argument("--keep-boxes", action="store_true", help="keep VG samples and samples with bounding boxes in the text")
    m.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the collages")
    args = p.parse_args(argv)
    try:
        compose.parse_counts(args.counts, allowed=set(LAYOUTS))
    except ValueError as e:
        p.error(f"--counts: {e}")
    if not 0 <= args.merge <= 1:
        p.error("--merge must be in [0, 1]")
    args = common.apply_recipe(args, RECIPES, common.is_toy_data(args.data), "02_make_grid")
    return compose.resolve_paths(args, "grid", image_dir="mia_grid")


if __name__ == "__main__":
    common.run_stage(main, get_args)
