"""Shared test fixtures and helpers (import helpers with `from conftest import ...`).
Tests run from the repository root with HF_HUB_OFFLINE=1.

`make_llava_set` (the 01, 02 and 03 tests' data, fixture `ds`) builds a tiny LLaVA-format set
with PIL: sub-datasets a (10 images, one 96x48), b (10), c (2: too small for 2 companions),
vg (2); one row per image with the `<image>` marker in every position, some multi-turn, some
already labelled (`Image3:<image>\\nIn Image3, ...`); plus one row of each bad kind.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stage scripts import as modules: importlib.import_module("02_make_grid")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_tiny(tmp_path_factory):
    """A tiny toy world and base built once per session through the command lines of 00_make_toy.py
    (the world) and 00_train_toy.py (the base): returns the root holding data/toy and models/toy-llava."""
    root = tmp_path_factory.mktemp("toy")
    for script in ("00_make_toy.py", "00_train_toy.py"):
        run = subprocess.run([sys.executable, str(ROOT / script), "--tiny", "--root", str(root)],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    return root


# ---- the tiny LLaVA-format set of the 01-03 tests ----
# solid colours far from white, black and each other (levels 0/90/180 per channel)
PALETTE = [(r, g, b) for r in (0, 90, 180) for g in (0, 90, 180) for b in (0, 90, 180)][1:]
QUESTIONS = [
    "<image>\nWhat color is the shape?",
    "What color is the shape?\n<image>",
    "<image>What color is the shape?",
    "What color is the shape?<image>",
    "Image3:<image>\nIn Image3, what color is the shape?",
]
BAD = {"missing image": "bad-missing", "unreadable image": "bad-corrupt", "no <image> in first human turn": "bad-noimage",
       "empty answer": "bad-empty", "text-only row": "bad-textonly"}


def make_llava_set(root):
    """-> dict(data=train.json, jsonl=train.jsonl, bad=bad.jsonl (malformed line 3), root=images dir, colors={path: rgb})."""
    root = Path(root)
    images, rows, colors = root / "images", [], {}
    k = 0
    for subset, n in (("a", 10), ("b", 10), ("c", 2), ("vg", 2)):
        (images / subset).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rel, color = f"{subset}/{subset}-{i:02d}.png", PALETTE[k]
            size = (96, 48) if rel == "a/a-03.png" else (64, 64)
            Image.new("RGB", size, color).save(images / rel)
            colors[rel] = color
            conv = [{"from": "human", "value": QUESTIONS[k % len(QUESTIONS)]}, {"from": "gpt", "value": f"color{k}"}]
            if k % 3 == 0:
                conv += [{"from": "human", "value": "What color is the background?"}, {"from": "gpt", "value": "none"}]
            if rel == "b/b-09.png":
                conv[0]["value"] = "<image>\nWhat is in the region [0.12, 0.3, 0.5, 0.77]?"
            rows.append({"id": f"{subset}-{i:02d}", "image": rel, "conversations": conv, "toy": {"color": f"color{k}"}})
            k += 1
    (images / "c" / "corrupt.png").write_bytes(b"this is not an image")

    def bad(rid, image="a/a-00.png", q="<image>\nWhat?", a="x"):
        row = {"id": rid, "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        return row if image else {k: v for k, v in row.items() if k != "image"}

    rows += [bad("bad-missing", image="a/missing.png"), bad("bad-corrupt", image="c/corrupt.png"),
             bad("bad-noimage", q="What color?"), bad("bad-empty", a="  "), bad("bad-textonly", image=None)]
    (root / "train.json").write_text(json.dumps(rows, indent=1))
    lines = [json.dumps(r) for r in rows]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "bad.jsonl").write_text("\n".join(lines[:2] + ['{"id": "broken", "image": '] + lines[2:]) + "\n")
    return {"data": root / "train.json", "jsonl": root / "train.jsonl", "bad": root / "bad.jsonl",
            "root": images, "colors": colors, "rows": rows}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_llava_set(tmp_path_factory.mktemp("llava"))


def run(mod, ds, out, *argv):
    """mod.main on the test set -> (rows, sidecar dict)."""
    mod.main(mod.get_args(["--data", str(ds["data"]), "--image-root", str(ds["root"]), "--out", str(out), *argv]))
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    return rows, json.loads(Path(str(out) + ".meta.json").read_text())


def pytest_collection_modifyitems(config, items):
    """A test that needs the session's toy world (`toy_tiny`: two stage runs as subprocesses, tens of
    seconds on 2 cores) is slow: `-m "not slow"` leaves it out, so the edit-test loop stays fast."""
    for item in items:
        if "toy_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
