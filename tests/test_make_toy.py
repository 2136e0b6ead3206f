"""00_make_toy.py through its command line: files, reload, determinism, reuse."""
import hashlib
import importlib
import json
import subprocess
import sys

import pytest
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
    dev = json.loads((data / "dev.json").read_text())
    ids = [{r["id"] for r in x} for x in (train, dev, held)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
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
    held = report["heldout"]
    assert 0 <= held["single-image"]["accuracy"] <= 1 and held["single-image"]["n"] >= 30
    assert [held[f"sequence {n}"]["n"] for n in (2, 3, 4, 5)] == [5] * 4
    assert len(json.loads((data / "dev.json").read_text())) >= 15


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
    for sub in ("plain", "speckled", "striped"):  # what 00 writes (other tests add folders beside them)
        assert _tree_hash(tmp_path / "data" / "toy" / "images" / sub) == _tree_hash(toy_tiny / "data" / "toy" / "images" / sub)
    for f in ("train.json", "dev.json", "heldout.json"):
        assert (tmp_path / "data" / "toy" / f).read_bytes() == (toy_tiny / "data" / "toy" / f).read_bytes()
    a = load_file(tmp_path / "models" / "toy-llava" / "model.safetensors")
    b = load_file(toy_tiny / "models" / "toy-llava" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "reusing" in again.stdout and "single-image" in again.stdout


def test_another_seed_another_world(toy_tiny, tmp_path):
    sys.path.insert(0, str(ROOT))
    import importlib

    toy = importlib.import_module("00_make_toy")
    a = toy.make_row(0, "plain", 1, 0.25)
    assert a == toy.make_row(0, "plain", 1, 0.25)
    assert any(toy.make_row(1, "plain", i, 0.25)["toy"] != toy.make_row(0, "plain", i, 0.25)["toy"] for i in range(5))


def test_sequence_examples_ask_about_the_labelled_image(toy_tiny):
    import importlib
    import re

    toy = importlib.import_module("00_make_toy")
    rows = json.loads((toy_tiny / "data" / "toy" / "train.json").read_text())
    ex = toy.sequence_examples(0, rows, 4, [2, 5], "t")
    assert ex == toy.sequence_examples(0, rows, 4, [2, 5], "t") and len(ex) == 8
    for e in ex:
        n = len(e["images"])
        assert e["kind"] == f"sequence {n}" and len(set(e["images"])) == n
        assert e["q"].startswith("".join(f"Image{j}:<image>\n" for j in range(1, n + 1)))
        k = int(re.search(r"In Image(\d), what", e["q"]).group(1))
        assert e["a"] == e["per_image"][k - 1]
        attr = "color" if "shape" in e["q"] else "background"
        by_path = {r["image"]: r["toy"][attr] for r in rows}
        assert e["per_image"] == [by_path[p] for p in e["images"]]


def test_text_prior_examples_bind_the_label_to_its_span():
    import random

    toy = importlib.import_module("00_make_toy")
    rng = random.Random(0)
    for n_tokens in (2, 4, 16):
        for _ in range(20):
            ex = toy.text_prior_example(rng, 3, n_tokens)
            lines = ex["q"].split("\n")
            k = int(lines[-1].split(",")[0].removeprefix("In Image"))
            span = lines[k - 1].split(": ", 1)[1].split()
            assert lines[k - 1].startswith(f"Image{k}: ") and len(span) == n_tokens
            scene = ex["scenes"][k - 1]
            assert ex["a"] == (scene["background"] if "background" in lines[-1] else scene["color"])
            assert scene["color"] in span and (n_tokens < 4 or span.count(scene["background"]) >= 1)


def test_every_training_phase_runs_and_is_logged(tmp_path):
    """The language prior, the frozen-LM alignment steps and the text mix, briefly, on a tiny build."""
    toy = importlib.import_module("00_make_toy")
    a = toy.get_args(["--tiny", "--root", str(tmp_path)])
    a.text_prior_steps, a.freeze_lm_steps, a.text_mix, a.text_questions = 4, 3, 0.25, 2
    assert toy.committed_base(a) is None  # tiny settings: never the committed base
    report = toy.main(a)
    assert [r["step"] for r in report["text_prior_log"]] == [0, 3]
    assert report["settings"]["text_prior_steps"] == 4 and (tmp_path / "models/toy-llava/config.json").is_file()


def test_committed_base_is_used_only_for_its_own_settings():
    toy = importlib.import_module("00_make_toy")
    a = toy.get_args([])
    if not (toy.COMMITTED_BASE / "config.json").is_file():
        pytest.skip("no committed base in this checkout")
    assert toy.committed_base(a) == toy.COMMITTED_BASE
    settings = json.loads((toy.COMMITTED_BASE / "toy_report.json").read_text())["settings"]
    assert all(settings[k] == getattr(a, k) for k in toy.WEIGHT_SETTINGS)
    a.lr = a.lr * 2
    assert toy.committed_base(a) is None
    assert toy.committed_base(toy.get_args(["--seed", "1"])) is None
