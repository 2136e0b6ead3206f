"""00_make_toy.py through its command line: files, reload, determinism, reuse."""
import hashlib
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import common
from conftest import ROOT


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_toy_world_files_and_format(toy_tiny):
    data = toy_tiny / "data" / "toy"
    train = json.loads((data / "train.json").read_text())
    held = json.loads((data / "heldout.json").read_text())
    assert len(train) >= 90 and len(held) >= 30
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    for line, row in common.read_rows(data / "train.json"):
        (path,) = common.check_llava_row(row, data / "train.json", line)
        assert common.load_image(data / "images", path).size == (64, 64)
        assert row["conversations"][1]["value"] in (row["toy"]["color"], row["toy"]["background"])
    assert {r["image"].split("/")[0] for r in train} == {"plain", "speckled", "striped"}  # sub-datasets
    firsts = [r["conversations"][0]["value"] for r in train]
    assert any(q.startswith("<image>\n") for q in firsts) and any(q.endswith("\n<image>") for q in firsts)
    assert any(q.startswith("Image") and "<image>\nIn Image" in q for q in firsts)  # labelled, one image
    assert any(len(r["conversations"]) == 4 for r in train)
    report = json.loads((toy_tiny / "models" / "toy-llava" / "toy_report.json").read_text())
    assert 0 <= report["heldout_accuracy"]["all"] <= 1 and report["heldout_accuracy"]["n"] >= 30


def test_saved_model_reloads_like_a_downloaded_checkpoint(toy_tiny):
    path = toy_tiny / "models" / "toy-llava"
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    im = common.load_image(toy_tiny / "data" / "toy" / "images", "plain/plain-000000.png")
    enc = proc(text=["USER: <image>\nWhat color is the shape? ASSISTANT:"], images=[[im]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(proc.tokenizer)) and torch.isfinite(logits).all()


def test_same_seed_same_world_and_weights_and_reuse(toy_tiny, tmp_path):
    cmd = [sys.executable, str(ROOT / "00_make_toy.py"), "--tiny", "--root", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _tree_hash(tmp_path / "data" / "toy" / "images") == _tree_hash(toy_tiny / "data" / "toy" / "images")
    for f in ("train.json", "heldout.json"):
        assert (tmp_path / "data" / "toy" / f).read_bytes() == (toy_tiny / "data" / "toy" / f).read_bytes()
    a = load_file(tmp_path / "models" / "toy-llava" / "model.safetensors")
    b = load_file(toy_tiny / "models" / "toy-llava" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "reusing" in again.stdout and "held-out single-image accuracy" in again.stdout


def test_another_seed_another_world(toy_tiny, tmp_path):
    sys.path.insert(0, str(ROOT))
    import importlib

    toy = importlib.import_module("00_make_toy")
    a = toy.make_row(0, "plain", 1, 0.25)
    assert a == toy.make_row(0, "plain", 1, 0.25)
    assert any(toy.make_row(1, "plain", i, 0.25)["toy"] != toy.make_row(0, "plain", i, 0.25)["toy"] for i in range(5))
