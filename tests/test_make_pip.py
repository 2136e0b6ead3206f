"""03_make_pip.py: inset geometry, phrases, composites pixel-wise, skips, determinism, CLI."""
import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compose  # noqa: E402
from conftest import BAD, run  # noqa: E402  (the shared tiny LLaVA set; fixture `ds`)

pip = importlib.import_module("03_make_pip")


@pytest.fixture(scope="module")
def pip_run(ds, tmp_path_factory):
    return run(pip, ds, tmp_path_factory.mktemp("out") / "pip.jsonl")


# ---- pure functions ----
@pytest.mark.parametrize("bg, fg, box", [
    ((100, 100), (64, 64), (15, 15, 85, 85)),
    ((640, 480), (64, 32), (96, 128, 544, 352)),  # width binds: 448 x 224 inside 448 x 336
    ((640, 480), (30, 60), (236, 72, 404, 408)),  # height binds: 168 x 336
    ((640, 480), (448, 336), (96, 72, 544, 408)),  # exactly 0.7 x: pasted as is
    ((64, 64), (96, 48), (10, 21, 54, 43)),  # toy: 44 x 22
    ((3, 3), (500, 1), (0, 1, 2, 2)),  # never smaller than 1 px
])
def test_inset_box_hand_cases(bg, fg, box):
    assert pip.inset_box(bg, fg) == box


def test_inset_box_properties():
    rng = random.Random(0)
    for _ in range(2000):
        W, H, w, h = (rng.randint(1, 2000) for _ in range(4))
        x0, y0, x1, y1 = pip.inset_box((W, H), (w, h))
        bw, bh = int(W * 0.7 + 1e-9), int(H * 0.7 + 1e-9)
        assert 1 <= x1 - x0 <= max(1, bw) and 1 <= y1 - y0 <= max(1, bh)
        assert (x1 - x0 == max(1, bw)) or (y1 - y0 == max(1, bh))  # as large as fits: one side binds
        assert abs(x0 - (W - x1)) <= 1 and abs(y0 - (H - y1)) <= 1  # centred
        if min(x1 - x0, y1 - y0) > 1:  # aspect kept: the free side is rounded to the nearest pixel
            assert abs((x1 - x0) * h - (y1 - y0) * w) <= max(w, h) / 2


def test_every_phrase_makes_a_prompt_the_later_stages_read_as_pic_in_pic():
    """A phrase must not name an image by number: 07 would read `In Image2,` as a sequence or grid
    target and 01's rewrite would strip it as a label. Each one opens the question: capitalised,
    no comma of its own (the prompt is `{phrase}, {question}`)."""
    ev = importlib.import_module("07_eval")
    assert len(set(pip.PHRASES)) == len(pip.PHRASES)
    for phrase in pip.PHRASES:
        prompt = f"<image>\n{phrase}, {compose.lower_first('What color is the shape?')}"
        assert ev.TARGET.search(prompt) is None, phrase
        assert compose.clean_question(prompt) == f"{phrase}, what color is the shape?", phrase
        assert phrase[0].isupper() and "," not in phrase and prompt.count("<image>") == 1


def test_composites_pixelwise(ds, pip_run):
    rows, _ = pip_run
    for r in rows:
        m = r["mia"]
        bg_path, target = m["companions"][0], m["source_images"][0]
        assert bg_path != target and r["image"][0].startswith("mia_pip/") and len(r["image"]) == 1
        a = np.asarray(Image.open(ds["root"] / r["image"][0]).convert("RGB")).astype(int)
        bg_size = Image.open(ds["root"] / bg_path).size
        assert (a.shape[1], a.shape[0]) == bg_size == tuple(m["size"])
        assert m["inset"] == list(pip.inset_box(bg_size, Image.open(ds["root"] / target).size))
        x0, y0, x1, y1 = m["inset"]
        inner = a[y0 + 4:y1 - 4, x0 + 4:x1 - 4].reshape(-1, 3).mean(0)
        assert np.abs(inner - ds["colors"][target]).max() < 8, r["id"]  # the target where recorded
        for corner in (a[:y0 - 3, :x0 - 3], a[y1 + 3:, x1 + 3:]):  # the background around it
            assert np.abs(corner.reshape(-1, 3).mean(0) - ds["colors"][bg_path]).max() < 8, r["id"]
        assert (m["format"], m["n_images"], m["target"]) == ("pip", 2, 1)


def test_prompts_phrases_per_turn_and_skips(ds, pip_run):
    rows, meta = pip_run
    assert meta["skipped"]["by_reason"] == {**{reason: 1 for reason in BAD}, "VG sample": 2, "bounding box in text": 1}
    assert len(rows) == 21
    used = set()
    for r in rows:
        humans = [t["value"] for t in r["conversations"][0::2]]
        assert humans[0].startswith("<image>\n") and sum(h.count("<image>") for h in humans) == 1
        for h in humans:
            phrase, _, question = h.removeprefix("<image>\n").partition(", ")
            assert phrase in pip.PHRASES and question in ("what color is the shape?", "what color is the background?")
            used.add(phrase)
    assert len(used) >= 10  # drawn per turn, not one fixed phrase


def test_deterministic_across_workers_and_input_order(ds, tmp_path):
    lines = ds["jsonl"].read_text().splitlines()
    random.Random(3).shuffle(lines)
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines) + "\n")
    outs = []
    for data, workers in ((ds["data"], 1), (ds["jsonl"], 2), (tmp_path / "shuffled.jsonl", 2)):
        out = tmp_path / f"p{len(outs)}.jsonl"
        pip.main(pip.get_args(["--data", str(data), "--image-root", str(ds["root"]), "--out", str(out),
                               "--image-out", str(ds["root"] / "det"), "--workers", str(workers)]))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        outs.append((out.read_bytes(), [(ds["root"] / r["image"][0]).read_bytes() for r in rows]))
    assert outs[0] == outs[1] == outs[2]


def test_command_line_smoke(ds, tmp_path):
    out = tmp_path / "pip.jsonl"
    p = subprocess.run([sys.executable, "03_make_pip.py", "--data", str(ds["jsonl"]), "--image-root", str(ds["root"]),
                        "--out", str(out), "--image-out", str(ds["root"] / "cli"), "--companions", "subset", "--keep-boxes"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "24 written" in p.stdout and "VG sample" not in p.stdout  # --keep-boxes keeps VG and box rows
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for r in rows:  # same sub-dataset background unless it holds no other image
        if not r["mia"]["companions_fallback"]:
            assert r["mia"]["companions"][0].split("/")[0] == r["mia"]["source_images"][0].split("/")[0]
    h = subprocess.run([sys.executable, "03_make_pip.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--scale" in h.stdout and "--image-out" in h.stdout
