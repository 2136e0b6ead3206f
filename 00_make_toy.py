"""
00_make_toy.py — the embedded default, part 1: a synthetic single-image QA world, so that every
later stage has data (00_train_toy.py then trains the tiny LLaVA base on it).

out: data/toy/{train,dev,heldout}.json + data/toy/images/<subset>/<id>.png   (LLaVA-665k format)
     data/toy/train.json.meta.json   (the world's settings: 00_train_toy.py and later stages read it)
  python 00_make_toy.py && python 00_train_toy.py                     # seconds: data + the committed base
  python 00_make_toy.py --seed 1                                      # another world (00_train_toy.py then trains its base)
  python 00_make_toy.py --tiny --root /tmp/t && python 00_train_toy.py --tiny --root /tmp/t   # what the tests run

The world: a 64x64 image holds one coloured shape on a coloured background; three visual
styles play the part of LLaVA's sub-datasets (coco, gqa, ...): `plain`, `speckled`, `striped`.
Questions ask the shape's or the background's colour (one-word answers) or, for a share of turns
(--describe-share), describe the image: "a red shape on gray", two attributes in one answer.
A share of prompts already use the multi-image syntax with a single image
(`Image3:<image>\nIn Image3, what color is the shape?`): the model knows the words but has
never had to pick one image among several — like a real LLaVA trained on single images,
which is what MIA-DPO starts from. Every sample keeps its scene under `toy`, so stage 07 can
tell which image of a prompt a wrong answer is true of.

Scenes, questions and images come from the seed and the sample's id alone (common.row_rng):
the same settings give the same bytes on any machine. Existing data is reused when its
sidecar records the same settings (WORLD_SETTINGS), unless --force.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import common
from compose import lower_first  # the rewrite 01-03 apply: `In ImageK, what ...`

# ---- method: the world (edit me) -----------------------------------------------------------
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 225),
                "yellow": (235, 215, 40), "purple": (140, 60, 185), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128), "brown": (115, 75, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
SUBSETS = ("plain", "speckled", "striped")  # the toy's "sub-datasets"
QUESTIONS = {  # what is asked -> phrasings
    "color": ("What color is the shape?", "What is the color of the shape?"),
    "background": ("What color is the background?", "What is the color of the background?"),
    "describe": ("Describe the image.", "What does the image show?"),
}
ANSWERS = {"color": "{color}", "background": "{background}", "describe": "a {color} shape on {background}"}


def answer(scene, asked):
    """The answer to a question about a scene: one colour word, or for "describe" both colours in
    one sentence, where element interference can show (one image's shape colour with another's
    background). answer({"color": "red", "background": "gray"}, "describe") -> "a red shape on gray"."""
    return ANSWERS[asked].format(**scene)


def asked_of(question):
    """Which QUESTIONS entry a prompt asks, from its last line's phrasing (any `In ImageK, ` prefix):
    asked_of("Image2:<image>\\nIn Image2, describe the image.") -> "describe"."""
    last = question.replace("\n<image>", "").strip().split("\n")[-1].lower()
    for asked, phrasings in QUESTIONS.items():
        if any(last.endswith(ph.lower()) for ph in phrasings):
            return asked
    raise ValueError(f"not a toy question: {question!r}")


def draw_scene(seed, size, shape, color, background, subset):
    """Render one scene -> uint8 array (size, size, 3). All randomness from `seed`."""
    r = np.random.default_rng(seed)
    bg = np.array(BACKGROUNDS[background], float) + r.integers(-12, 13, 3)
    img = np.zeros((size, size, 3)) + bg
    yy, xx = np.mgrid[0:size, 0:size]
    if subset == "speckled":  # salt-and-pepper-ish texture on the background
        spots = r.random((size, size)) < 0.15
        img[spots] += r.normal(0, 45, (int(spots.sum()), 1))
    elif subset == "striped":  # darker stripes, horizontal or vertical
        period = int(r.integers(6, 12))
        coord = yy if r.random() < 0.5 else xx
        img[(coord % period) < period // 2] *= 0.75
    s = r.uniform(0.42, 0.62) * size  # shape extent
    cx, cy = r.uniform(s / 2 + 2, size - s / 2 - 2, 2)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= (s / 2) ** 2
    elif shape == "square":
        inside = (abs(dx) <= s / 2) & (abs(dy) <= s / 2)
    elif shape == "triangle":  # apex up
        inside = (dy <= s / 2) & (dy >= -s / 2) & (abs(dx) <= (dy + s / 2) / 2)
    else:  # cross
        inside = ((abs(dx) <= s / 6) & (abs(dy) <= s / 2)) | ((abs(dy) <= s / 6) & (abs(dx) <= s / 2))
    img[inside] = np.array(SHAPE_COLORS[color], float) + r.integers(-18, 19, 3)
    img += r.normal(0, 4, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_row(seed, subset, index, labelled_share, describe_share):
    """One LLaVA-format sample with 1-2 turns about one scene (the scene kept under `toy`); each turn
    is a "describe" question with probability describe_share (at most one per row), else one of the
    one-word questions. make_row(0, "plain", 1, 0.25, 0.3)["id"] -> "plain-000001"; same arguments, same row."""
    rid = f"{subset}-{index:06d}"
    rng = common.row_rng(seed, rid)
    scene = {"shape": rng.choice(SHAPES), "color": rng.choice(list(SHAPE_COLORS)),
             "background": rng.choice(list(BACKGROUNDS))}
    one_word = ["color", "background"]
    rng.shuffle(one_word)
    attrs = []
    for _ in range(rng.choice((1, 2))):
        attrs.append("describe" if "describe" not in attrs and rng.random() < describe_share else one_word.pop())
    qs = [rng.choice(QUESTIONS[a]) for a in attrs]
    if rng.random() < labelled_share:  # multi-image syntax, one image
        k = rng.randint(1, 5)
        qs = [f"In Image{k}, " + lower_first(q) for q in qs]
        qs[0] = f"Image{k}:<image>\n" + qs[0]
    elif rng.random() < 0.1:  # LLaVA data also has the image after the text
        qs[0] = qs[0] + "\n<image>"
    else:
        qs[0] = "<image>\n" + qs[0]
    conv = []
    for q, a in zip(qs, attrs):
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answer(scene, a)}]
    return {"id": rid, "image": f"{subset}/{rid}.png", "conversations": conv, "toy": scene}



# ---- plumbing ---------------------------------------------------------------------------------
SPLITS = {"train": 0, "dev": 400_000, "heldout": 500_000}  # index offsets: disjoint ids, disjoint scenes
# The settings that decide the world's bytes (and, read back by 00_train_toy.py, part of its base's).
WORLD_SETTINGS = ("seed", "n_train", "n_dev", "n_heldout", "max_images", "image_size", "labelled_share", "describe_share")


def make_data(a, data_dir):
    """Write images + {train,dev,heldout}.json and the sidecar; return {split: rows}."""
    from PIL import Image

    sizes = {"train": a.n_train, "dev": a.n_dev, "heldout": a.n_heldout}
    out = {}
    for split, offset in SPLITS.items():
        rows = []
        for subset in SUBSETS:
            (data_dir / "images" / subset).mkdir(parents=True, exist_ok=True)
            for i in range(offset, offset + math.ceil(sizes[split] / len(SUBSETS))):
                row = make_row(a.seed, subset, i, a.labelled_share, a.describe_share)
                pixels = draw_scene(common.row_rng(a.seed, row["id"]).getrandbits(63), a.image_size,
                                    **row["toy"], subset=subset)
                with common.atomic_write(data_dir / "images" / row["image"], "wb") as f:
                    Image.fromarray(pixels).save(f, format="PNG")
                rows.append(row)
        with common.atomic_write(data_dir / f"{split}.json") as f:
            json.dump(rows, f, indent=0)
        out[split] = rows
    # subtle: the script is named explicitly (not argv[0]): other stages recognise toy data by it,
    # also when a test calls main() in-process
    common.write_sidecar(data_dir / "train.json", a, counts={k: len(v) for k, v in out.items()},
                         script=Path(__file__).name)
    return out


def read_split(data_dir, split):
    return [row for _, row in common.read_rows(Path(data_dir) / f"{split}.json")]


def read_world(data_dir):
    """The WORLD_SETTINGS a folder's world was built with, from its sidecar -> dict, or None when
    the folder holds no complete world written by this script."""
    data_dir = Path(data_dir)
    try:
        meta = json.loads(common.sidecar_path(data_dir / "train.json").read_text())
    except (OSError, ValueError):
        return None
    args = meta.get("args") or {}
    if meta.get("script") != Path(__file__).name or not all(k in args for k in WORLD_SETTINGS):
        return None
    if not all((data_dir / f"{s}.json").is_file() for s in SPLITS):
        return None
    return {k: args[k] for k in WORLD_SETTINGS}


def main(a):
    data_dir = Path(a.data_out or Path(a.root) / "data" / "toy")
    wanted, have = {k: getattr(a, k) for k in WORLD_SETTINGS}, read_world(data_dir)
    if not a.force and have == wanted:
        rows = {s: read_split(data_dir, s) for s in SPLITS}
        print(f"data: reusing {data_dir} ({', '.join(f'{len(v)} {k}' for k, v in rows.items())} samples; --force rebuilds)")
        return rows
    if have is not None and have != wanted:
        print(f"data: {data_dir} holds another world ({', '.join(f'{k} {v}' for k, v in have.items() if wanted[k] != v)}): "
              f"rebuilding it")
    t = time.time()
    rows = make_data(a, data_dir)
    print(f"data: {', '.join(f'{len(v)} {k}' for k, v in rows.items())} samples -> {data_dir} "
          f"({time.time() - t:.1f} s); next: python 00_train_toy.py")
    return rows


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("output")
    g.add_argument("--root", default=".", help="prefix for the default output directory")
    g.add_argument("--data-out", default=None, help="data directory (default ROOT/data/toy)")
    g.add_argument("--force", action="store_true", help="rebuild the data even if it exists with these settings")
    g = p.add_argument_group("world")
    g.add_argument("--n-train", type=int, default=6000, help="single-image training samples")
    g.add_argument("--n-dev", type=int, default=600, help="dev samples, for tuning later stages (disjoint scenes)")
    g.add_argument("--n-heldout", type=int, default=600, help="held-out samples, for final numbers only (disjoint scenes)")
    g.add_argument("--max-images", type=int, default=5,
                   help="largest image count of a prompt in this world (00_train_toy.py evaluates 2..N-image sequences)")
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--labelled-share", type=float, default=0.25, help="share of prompts written `ImageK:<image>\\nIn ImageK, ...`")
    g.add_argument("--describe-share", type=float, default=0.3,
                   help="share of turns that ask to describe the image (two-attribute answers; 0: one-word answers only)")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="decides every scene, question and pixel (and the base's training)")
    g.add_argument("--tiny", action="store_true", help="a second-long build for tests (few samples)")
    if p.parse_known_args(argv)[0].tiny:  # a preset of defaults: flags given beside --tiny still win
        p.set_defaults(n_train=90, n_dev=15, n_heldout=30)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
