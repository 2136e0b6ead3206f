"""
03_make_pip.py — stage 3: single-image samples -> pic-in-pic samples (target inset on an unrelated background).
in : LLaVA-format JSON list or JSONL + image root     out: JSONL + composite JPEGs (+ .meta.json sidecar)

  python 03_make_pip.py                       # toy: data/toy/train.json -> data/toy/pip.jsonl + data/toy/images/mia_pip/
  python 03_make_pip.py --data llava_v1_5_mix665k.json --image-root /data/llava \\
      --out data/pip.jsonl --workers 8        # composites go to /data/llava/mia_pip/

Each usable source image (the target) is resized, keeping its aspect ratio (LANCZOS, also
upwards), to the largest size inside 0.7 x the background's width and height, and pasted
centred on a background drawn uniformly from all other usable images (--companions subset:
from the row's sub-dataset). The composite keeps the background's size.
Prompt: `<image>\\n{phrase}, {question, first letter lower-cased}` and `{phrase}, ...` on later
turns, a phrase drawn per turn from PHRASES (64 of our own: 8 openings x 8 ways to name the
inset). Question cleaning, the lower-casing rule and the companion draw: compose.py, shared by
01-03. VG samples and samples with bounding boxes in the text are skipped unless
--keep-boxes (coordinates of the source image mean nothing on the composite; the rule is
compose.composite_turns, shared with 02). Recipes: `toy` takes a 1000-row subset of the toy world's
data, `paper` every row (`--recipe auto` picks toy for files 00_make_toy.py wrote).

Output rows: id "pip-<source id>", image [<image-out relative to image-root>/<name>.jpg],
conversations, the source's other top-level fields, and `mia` = {format, n_images 2 (the
pictures in the composite: 1 = the inset = target, 2 = the background), target 1, sources,
source_images, companions [background], size [W, H], inset [x0, y0, x1, y1] (pixel box of the
pasted target), companions_fallback}. Rows sorted by id: byte-identical for any --workers and
input order; images written atomically before the JSONL; skips as in 01 and 02.
"""
import argparse
import time
from functools import partial
from pathlib import Path

from PIL import Image

import common
import compose
from common import ImageError, Skips, load_image



# ---- method: what the paper specifies (edit me) ----
SCALE = 0.7  # the inset fits 0.7 x the background in both dimensions
RECIPES = {"toy": {"limit": 1000}, "paper": {"limit": 0}}
_OPENINGS = ("In", "For", "Regarding", "Looking at", "Considering", "As for", "Focusing on", "With respect to")
_INSETS = ("the central image", "the image in the center", "the inset picture", "the picture in the middle",
           "the middle plot", "the central subplot", "the inset subplot", "the small image in the center")
PHRASES = tuple(f"{o} {i}" for o in _OPENINGS for i in _INSETS)  # "Looking at the middle plot", ...


def inset_box(background_size, image_size, scale=SCALE):
    """Pixel box (x0, y0, x1, y1) of the target inside the background: fitted into
    floor(scale * W) x floor(scale * H), aspect kept, centred.
    inset_box((100, 100), (64, 64)) -> (15, 15, 85, 85);  inset_box((640, 480), (64, 32)) -> (96, 128, 544, 352)
    """
    W, H = background_size
    w, h = compose.fit(*image_size, max(1, int(W * scale + 1e-9)), max(1, int(H * scale + 1e-9)))
    x0, y0 = (W - w) // 2, (H - h) // 2
    return x0, y0, x0 + w, y0 + h


def compose_pip(target, background, scale=SCALE):
    """PIL RGB images -> (composite of the background's size, inset box)."""
    box = inset_box(background.size, target.size, scale)
    w, h = box[2] - box[0], box[3] - box[1]
    canvas = background.copy()
    canvas.paste(target if target.size == (w, h) else target.resize((w, h), Image.LANCZOS), box[:2])
    return canvas, box


def plan_pip(src, pools, rng, same_subset=False, first_turn_only=False):
    """One source -> plan (background, conversation). rng draws, in order: background, phrases."""
    local = pools.get(src.subset, []) if same_subset else pools[None]
    (background,), fell_back = compose.draw_companions(rng, {src.image}, local, pools[None], 1)
    qs, ans = (src.questions[:1], src.answers[:1]) if first_turn_only else (src.questions, src.answers)
    phrases = [rng.choice(PHRASES) for _ in qs]
    turns = compose.labelled_turns(qs, ans, phrases, common.MARKER + "\n")
    return {"id": f"pip-{src.id}", "target": src.image, "background": background, "turns": turns, "fell_back": fell_back}


# ---- plumbing ----
def render(item, image_root, image_out, quality, scale):
    """Worker: load target and background, compose, save -> ((inset box, size, None) or (None,
    None, skip reason), the background if it failed to decode, else None)."""
    try:
        target = load_image(image_root, item["target"])
    except ImageError as e:
        return (None, None, f"unreadable image: {e}"), None
    try:
        background = load_image(image_root, item["background"])
    except ImageError:
        return None, item["background"]  # drawn again by plan_and_render
    canvas, box = compose_pip(target, background, scale)
    compose.save_jpeg(canvas, Path(image_out) / item["file"], quality)
    return (box, canvas.size, None), None


def main(args):
    t0 = time.time()
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    skips = Skips()
    sources, n_read = compose.load_sources(args, skips, partial(compose.composite_turns, max_answer_chars=args.max_answer_chars,
                                                                keep_boxes=args.keep_boxes))

    def plan(src, pools, rng):
        item = plan_pip(src, pools, rng, args.companions == "subset", args.first_turn_only)
        name = compose.file_name(item["id"], item["target"], item["background"], args.scale, args.jpeg_quality)
        return {**item, "file": name + ".jpg"}

    Path(args.image_out).mkdir(parents=True, exist_ok=True)
    done = compose.plan_and_render(sources, lambda src: src.id, plan,
                                   partial(render, image_root=args.image_root, image_out=args.image_out,
                                           quality=args.jpeg_quality, scale=args.scale),
                                   compose.build_pools(sources), args.seed, args.workers, "pic-in-pic")
    ref = compose.image_ref(args.image_out, args.image_root)
    rows, n_fallback = [], 0
    for src, (item, out) in zip(sources, done):
        box, size, err = (None, None, str(out)) if item is None else out
        if err:
            skips.add(src.id, err, args.data, src.line)
            continue
        mia = {"format": "pip", "n_images": 2, "target": 1, "sources": [src.id], "source_images": [src.image],
               "companions": [item["background"]], "size": list(size), "inset": list(box),
               "companions_fallback": item["fell_back"]}
        rows.append(compose.output_row(item["id"], [f"{ref}/{item['file']}"], item["turns"], src.row, mia))
        n_fallback += item["fell_back"]
    counts = {"rows_read": n_read, "rows_written": len(rows), "companions_fallback": n_fallback}
    compose.finish("03_make_pip", args, rows, skips, counts, t0)
    return rows, skips, counts


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    m = compose.add_shared_args(p, image_out="mia_pip")
    compose.add_source_flags(m)
    m.add_argument("--scale", type=float, default=SCALE, help="the inset fits this fraction of the background's width and height")
    m.add_argument("--companions", choices=("subset", "any"), default="any",
                   help="draw the background from all images or from the row's sub-dataset")
    m.add_argument("--keep-boxes", action="store_true", help="keep VG samples and samples with bounding boxes in the text")
    m.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the composites")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    args = common.apply_recipe(args, RECIPES, common.is_toy_data(args.data), "03_make_pip")
    return compose.resolve_paths(args, "pip", image_dir="mia_pip")


if __name__ == "__main__":
    common.run_stage(main, get_args)
