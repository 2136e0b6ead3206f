"""02_make_grid.py: layout geometry, labels, collages pixel-wise, merging, skips, determinism, CLI."""
import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import BAD, make_llava_set, run  # noqa: E402  (the shared tiny LLaVA set; fixture `ds`)

grid = importlib.import_module("02_make_grid")

SIZES = {2: (936, 488), 3: (1424, 488), 4: (936, 976), 6: (1424, 976), 9: (1424, 1464)}


@pytest.fixture(scope="module")
def grid_run(ds, tmp_path_factory):
    rows, meta = run(grid, ds, tmp_path_factory.mktemp("out") / "grid.jsonl", "--seed", "1")
    return rows, meta


# ---- pure functions ----
@pytest.mark.parametrize("n", sorted(SIZES))
def test_geometry_of_all_five_layouts(n):
    size, cells = grid.grid_geometry(n)
    rows, cols = grid.LAYOUTS[n]
    assert size == SIZES[n] and len(cells) == n == rows * cols
    for idx, (x0, y0, x1, y1) in enumerate(cells):
        i, j = divmod(idx, cols)  # row-major
        assert (x0, y0) == (j * 488, i * 488 + 40) and (x1 - x0, y1 - y0) == (448, 448)
        assert x1 <= size[0] and y1 <= size[1]
    assert cells[-1][2:] == size  # the last cell touches the bottom-right corner


def test_geometry_hand_cases():
    assert grid.grid_geometry(2) == ((936, 488), [(0, 40, 448, 488), (488, 40, 936, 488)])
    _, cells = grid.grid_geometry(9)
    assert cells[4] == (488, 528, 936, 976) and cells[8] == (976, 1016, 1424, 1464)


@pytest.mark.parametrize("size, box", [((64, 64), (0, 40, 448, 488)), ((96, 48), (0, 152, 448, 376)),
                                       ((30, 60), (112, 40, 336, 488)), ((1000, 1000), (0, 40, 448, 488))])
def test_paste_box_fits_and_centres(size, box):
    assert grid.paste_box(size, (0, 40, 448, 488)) == box


def test_font_is_bundled_freetype_size_36():
    font = grid.get_font()
    assert isinstance(font, ImageFont.FreeTypeFont) and font.size == 36


@pytest.mark.parametrize("n", sorted(SIZES))
def test_label_glyphs_stay_inside_their_strip(n):
    font, (size, cells) = grid.get_font(), grid.grid_geometry(n)
    draw = ImageDraw.Draw(Image.new("RGB", size))
    for k, (x0, y0, x1, _) in enumerate(cells, 1):
        text = f"Image{k}"
        l, t, r, b = draw.textbbox(grid.label_xy((x0, y0), font.getbbox(text)), text, font=font)
        assert l == x0 + 20 + font.getbbox(text)[0] and r < x1 and y0 - 40 <= t and b <= y0
        assert abs((t - (y0 - 40)) - (y0 - b)) <= 1  # vertically centred


# ---- the stage on the test set ----
def _mean(a, box, margin):
    x0, y0, x1, y1 = box
    return a[y0 + margin:y1 - margin, x0 + margin:x1 - margin].reshape(-1, 3).mean(0)


def test_collages_pixelwise(ds, grid_run):
    rows, _ = grid_run
    assert rows and {r["mia"]["n_images"] for r in rows} <= set(SIZES)
    for r in rows:
        m = r["mia"]
        assert r["image"][0].startswith("mia_grid/") and len(r["image"]) == 1
        a = np.asarray(Image.open(ds["root"] / r["image"][0]).convert("RGB")).astype(int)
        size, cells = grid.grid_geometry(m["n_images"])
        assert (a.shape[1], a.shape[0]) == tuple(m["size"]) == size and m["cells"] == [list(c) for c in cells]
        assert m["cell_images"][m["target"] - 1] == m["source_images"][0] and m["source_images"][0] not in m["companions"]
        for k, (path, cell, box) in enumerate(zip(m["cell_images"], m["cells"], m["pasted"]), 1):
            assert list(grid.paste_box(Image.open(ds["root"] / path).size, cell)) == box
            assert np.abs(_mean(a, box, 8) - ds["colors"][path]).max() < 8, (r["id"], k)  # each image where recorded
            x0, y0, x1, y1 = cell
            strip = a[y0 - 40:y0, x0:x1]
            dark = (strip.max(axis=2) < 100).sum()
            assert (strip.min(axis=2) > 200).mean() > 0.8 and dark > 100  # white strip with dark text
            assert a[y0 - 32:y0 - 8, x0 + 180:x1].min() > 240  # nothing right of the label (8 px: JPEG bleed)
            if box != cell:  # letterboxed image: the rest of its cell stays white
                assert a[y0:box[1] - 4, x0:x1].min() > 240
        if len(cells) > 1 and cells[1][0] > cells[0][2]:
            assert a[40:, 448 + 2:488 - 2].min() > 240  # the gap between the first two columns
        q = r["conversations"][0]["value"]
        assert q.startswith(f"<image>\nIn Image{m['target']}, ") and q.count("<image>") == 1


def test_skips_and_prompts(ds, grid_run):
    rows, meta = grid_run
    by_reason = meta["skipped"]["by_reason"]
    assert by_reason == {**{reason: 1 for reason in BAD}, "VG sample": 2, "bounding box in text": 1}
    assert meta["counts"]["rows_written"] == len(rows) == 21
    src = {r["id"]: r for r in ds["rows"]}
    for r in rows:
        s = src[r["mia"]["sources"][0]]
        assert r["id"] == "grid-" + s["id"] and r["toy"] == s["toy"]
        humans = r["conversations"][0::2]
        assert len(humans) == len(s["conversations"]) // 2
        assert all(h["value"].endswith(", what color is the shape?") or h["value"].endswith(", what color is the background?") for h in humans)
        assert all(h["value"].startswith(f"In Image{r['mia']['target']}, ") for h in humans[1:])


def test_merged_collages(ds, tmp_path):
    rows, meta = run(grid, ds, tmp_path / "g.jsonl", "--merge", "1", "--first-turn-only")
    used = [s for r in rows for s in r["mia"]["sources"]]
    assert sorted(used) == sorted(set(used)) and len(used) == 21  # every usable source exactly once
    assert any(len(r["mia"]["sources"]) == 3 for r in rows)
    assert sum(len(r["mia"]["sources"]) == 1 for r in rows) <= 2  # only the last visited can be left without partners
    for r in rows:
        m = r["mia"]
        assert r["id"] == "grid-" + "_".join(m["sources"]) and m["n_images"] >= len(m["sources"])
        assert [m["cell_images"][k - 1] for k in m["targets"]] == m["source_images"] and m["target"] == m["targets"][0]
        humans = [t["value"] for t in r["conversations"][0::2]]
        assert humans[0].startswith("<image>\n") and sum(h.count("<image>") for h in humans) == 1
        assert [h.removeprefix("<image>\n").split(",")[0] for h in humans] == [f"In Image{k}" for k in m["targets"]]


def test_deterministic_across_workers_and_input_order(ds, tmp_path):
    lines = ds["jsonl"].read_text().splitlines()
    random.Random(2).shuffle(lines)
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines) + "\n")
    outs = []
    for data, workers in ((ds["data"], 1), (ds["jsonl"], 2), (tmp_path / "shuffled.jsonl", 2)):
        out = tmp_path / f"g{len(outs)}.jsonl"
        grid.main(grid.get_args(["--data", str(data), "--image-root", str(ds["root"]), "--out", str(out), "--merge", "0.5",
                                 "--image-out", str(ds["root"] / "det"), "--workers", str(workers)]))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        outs.append((out.read_bytes(), [(ds["root"] / r["image"][0]).read_bytes() for r in rows]))
    assert outs[0] == outs[1] == outs[2]


def test_a_crash_never_leaves_rows_pointing_at_missing_images(ds, tmp_path, monkeypatch):
    out, image_out = tmp_path / "g.jsonl", tmp_path / "imgs"
    argv = ["--data", str(ds["data"]), "--image-root", str(ds["root"]), "--out", str(out), "--image-out", str(image_out),
            "--allow-outside-root"]  # collages outside the image root: rows name them by absolute path
    grid.main(grid.get_args(argv))
    before = out.read_bytes()
    calls = []

    def flaky(images, font):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed mid-run")
        return compose(images, font)

    compose = grid.compose_grid
    monkeypatch.setattr(grid, "compose_grid", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        grid.main(grid.get_args(argv + ["--seed", "9"]))
    assert out.read_bytes() == before  # the old JSONL is untouched ...
    for r in map(json.loads, before.decode().splitlines()):  # ... and every image it names is intact
        Image.open(r["image"][0]).verify()  # outside the image root: absolute paths
    assert not list(image_out.glob(".*.tmp"))


def test_truncated_image_is_caught_before_it_can_be_a_companion(tmp_path):
    d = make_llava_set(tmp_path)
    png = (d["root"] / "a" / "a-05.png").read_bytes()
    (d["root"] / "a" / "a-05.png").write_bytes(png[: len(png) // 2])  # a valid header, half the pixels
    rows, meta = run(grid, d, tmp_path / "g.jsonl", "--counts", "9")
    by_reason = meta["skipped"]["by_reason"]
    # the check before use (PIL's format check, no decoding) finds it: its own row is a counted
    # skip, and no good row is lost because it was drawn as a companion
    assert by_reason["unreadable image"] == 2 and "unreadable companion" not in by_reason  # it and bad-corrupt
    assert all("a/a-05.png" not in r["mia"]["cell_images"] for r in rows)
    assert len(rows) == 20


def test_command_line_smoke(ds, tmp_path):
    out = tmp_path / "grid.jsonl"
    p = subprocess.run([sys.executable, "02_make_grid.py", "--data", str(ds["jsonl"]), "--image-root", str(ds["root"]),
                        "--out", str(out), "--image-out", str(ds["root"] / "cli"), "--counts", "2", "--workers", "2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "21 written" in p.stdout and "2 VG sample" in p.stdout and "n_images 2:21" in p.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(Image.open(ds["root"] / r["image"][0]).size == (936, 488) for r in rows)
    assert all(r["image"][0].startswith("cli/") for r in rows)
    h = subprocess.run([sys.executable, "02_make_grid.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--image-out" in h.stdout and "--jpeg-quality" in h.stdout
