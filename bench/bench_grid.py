"""
bench_grid.py — 02_make_grid.py's throughput against the floor of the same work done bare.

  pip install -r requirements-bench.txt          # scikit-image: its bundled public-domain photos
  python bench/bench_grid.py                     # toy rows + photos, --workers 1 and 2, 3 repeats
  python bench/bench_grid.py --rows 600 --photos 150 --repeats 3

Two inputs: >= 500 toy rows (64x64 PNGs: data/toy/train.json when it exists, else made here
with the same look) and larger photos (scikit-image's astronaut, chelsea, coffee, rocket, ...,
300x451 to 1411x1411, randomly cropped and flipped into distinct JPEGs). For each input and
--workers 1 and 2, side by side in every repeat:
  stage : `python 02_make_grid.py ... --workers W`, wall time of the whole command (interpreter
          start, reading, checks, planning, labels, JSONL and sidecar included);
  floor : the same collages done bare in this process with W processes — decode every cell
          image, resize it to its recorded box (LANCZOS), paste on white, encode the JPEG at the
          same quality. Nothing else.
Reports medians over repeats of wall time and of CPU time (this process + reaped children: on a
shared, busy machine CPU time is the steadier measure of work), stage/floor ratios (goal <= 1.3)
and the wall-time speed-up of --workers 2.
Everything is written under a temporary folder (or --tmp) and removed afterwards.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "brick", "grass", "camera", "moon")


def make_toy_like(root, n, seed=0):
    """n rows of 64x64 shape-on-background PNGs in three sub-dataset folders -> data path."""
    rng, rows = random.Random(seed), []
    colors = [(220, 40, 40), (40, 170, 60), (50, 80, 225), (235, 215, 40), (140, 60, 185), (245, 140, 30)]
    for i in range(n):
        subset = ("plain", "speckled", "striped")[i % 3]
        im = Image.new("RGB", (64, 64), rng.choice([(235, 235, 235), (25, 25, 25), (128, 128, 128), (115, 75, 40)]))
        d = ImageDraw.Draw(im)
        if subset == "striped":
            for y in range(0, 64, 8):
                d.rectangle((0, y, 63, y + 3), fill=(170, 170, 170))
        if subset == "speckled":
            for _ in range(60):
                d.point((rng.randrange(64), rng.randrange(64)), fill=(255, 255, 255))
        x, y, s = rng.randrange(8, 32), rng.randrange(8, 32), rng.randrange(16, 28)
        d.ellipse((x, y, x + s, y + s), fill=rng.choice(colors))
        rel = f"{subset}/{subset}-{i:06d}.png"
        (root / subset).mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
        rows.append({"id": f"{subset}-{i:06d}", "image": rel,
                     "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json"


def make_photos(root, n, seed=0):
    """n distinct JPEGs cut from scikit-image's bundled photos (no download) -> data path."""
    from skimage import data as skdata

    rng, rows, photos = random.Random(seed), [], []
    for name in PHOTOS:
        a = getattr(skdata, name)()
        photos.append(Image.fromarray(a).convert("RGB"))
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        im = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        rel = f"photos/p-{i:05d}.jpg"
        im.save(root / rel, quality=90)
        rows.append({"id": f"p-{i:05d}", "image": rel,
                     "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a photo"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json"


def clocks():
    """(wall, CPU) seconds; CPU = this process + its reaped children (and theirs: pool workers)."""
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def since(start):
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def run_stage(data, image_root, out_dir, workers, extra=()):
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "02_make_grid.py", "--data", str(data), "--image-root", str(image_root),
           "--out", str(out_dir / "grid.jsonl"), "--image-out", str(out_dir / "img"), "--allow-outside-root",
           "--workers", str(workers), *extra]
    t = clocks()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return since(t)


def bare_collage(job):
    """The floor: decode + resize + paste + encode, nothing else."""
    image_root, cells, boxes, size, out, quality = job
    canvas = Image.new("RGB", size, "white")
    for path, (x0, y0, x1, y1) in zip(cells, boxes):
        with Image.open(Path(image_root) / path) as im:
            im = im.convert("RGB")
        canvas.paste(im if im.size == (x1 - x0, y1 - y0) else im.resize((x1 - x0, y1 - y0), Image.LANCZOS), (x0, y0))
    canvas.save(out, "JPEG", quality=quality)


def run_floor(rows, image_root, out_dir, workers, quality=95):
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(image_root), r["mia"]["cell_images"], r["mia"]["pasted"], tuple(r["mia"]["size"]),
             str(out_dir / f"{i}.jpg"), quality) for i, r in enumerate(rows)]
    t = clocks()
    if workers == 1:
        for j in jobs:
            bare_collage(j)
    else:
        with mp.Pool(workers) as pool:
            list(pool.imap(bare_collage, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8)))))
            pool.close()
            pool.join()  # reaped, so the workers' CPU time is counted
    return since(t)


def bench(name, data, image_root, tmp, args, extra=()):
    """Median wall and CPU seconds of stage and floor for --workers 1 and 2, interleaved in every repeat."""
    run_stage(data, image_root, tmp / "ref", 1, extra)  # warm the page cache; its output defines the floor's work
    rows = [json.loads(line) for line in (tmp / "ref" / "grid.jsonl").read_text().splitlines()]
    times = {f"{kind}_w{w}": [] for kind in ("stage", "floor") for w in (1, 2)}
    for rep in range(args.repeats):
        for w in (1, 2):
            times[f"stage_w{w}"].append(run_stage(data, image_root, tmp / f"s{w}", w, extra))
            times[f"floor_w{w}"].append(run_floor(rows, image_root, tmp / f"f{w}", w))
            (sw, sc), (fw, fc) = times[f"stage_w{w}"][-1], times[f"floor_w{w}"][-1]
            print(f"  {name} repeat {rep + 1} workers {w}: stage {sw:.2f} s ({sc:.2f} CPU-s), floor {fw:.2f} s ({fc:.2f} CPU-s)",
                  flush=True)
    return {"input": name, "rows": len(rows), "cells": sum(r["mia"]["n_images"] for r in rows),
            "median_wall_s": {k: statistics.median(t[0] for t in v) for k, v in times.items()},
            "median_cpu_s": {k: statistics.median(t[1] for t in v) for k, v in times.items()},
            "all_wall_cpu_s": times}


def table(results):
    lines = ["| input | collages (cells) | workers | stage wall s | floor wall s | stage collages/s | stage / floor, wall "
             "| stage CPU-s | floor CPU-s | stage / floor, CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, c = r["median_wall_s"], r["median_cpu_s"]
        for w in (1, 2):
            s, f, sc, fc = m[f"stage_w{w}"], m[f"floor_w{w}"], c[f"stage_w{w}"], c[f"floor_w{w}"]
            lines.append(f"| {r['input']} | {r['rows']} ({r['cells']}) | {w} | {s:.2f} | {f:.2f} | {r['rows'] / s:.1f} "
                         f"| {s / f:.2f}x | {sc:.2f} | {fc:.2f} | {sc / fc:.2f}x |")
    lines += ["", "| input | wall speed-up of --workers 2, stage | same, floor |", "|---|---|---|"]
    for r in results:
        m = r["median_wall_s"]
        lines.append(f"| {r['input']} | {m['stage_w1'] / m['stage_w2']:.2f}x | {m['floor_w1'] / m['floor_w2']:.2f}x |")
    return "\n".join(lines)


def main(args):
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench_grid_"))
    load = [os.getloadavg()[0]]
    try:
        results = []
        toy = ROOT / "data" / "toy"
        if (toy / "train.json").is_file() and not args.synthetic:  # its first --rows rows, images read in place
            name, image_root, data = "toy (data/toy)", toy / "images", tmp / "toy.json"
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text(json.dumps(json.loads((toy / "train.json").read_text())[: args.rows]))
        else:
            name = "toy-like (synthetic)"
            data = make_toy_like(tmp / "toy", args.rows)
            image_root = data.parent
        print(f"{name}: {args.rows} rows", flush=True)
        results.append(bench(name, data, image_root, tmp / "run_toy", args))
        data = make_photos(tmp / "photos", args.photos)
        print(f"photos: {args.photos} rows", flush=True)
        results.append(bench("photos (scikit-image)", data, data.parent, tmp / "run_photos", args))
        load.append(os.getloadavg()[0])
        print()
        print(table(results))
        print(f"\n1-minute load average at start / end: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs")
        results.append({"load_average_start_end": load, "cpus": os.cpu_count(), "argv": sys.argv[1:]})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--rows", type=int, default=600, help="toy rows (>= 500)")
    p.add_argument("--photos", type=int, default=150, help="photo rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic", action="store_true", help="make toy-like rows even when data/toy exists")
    p.add_argument("--tmp", help="work folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", default="bench/out/bench_grid.json", help="write the raw timings here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
