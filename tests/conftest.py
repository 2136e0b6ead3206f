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


# ---- 06_train_dpo.py: helpers its test files share (tests/test_train_dpo.py, test_prefix_sharing.py, test_trl_qwen.py)
@pytest.fixture
def one_thread():
    """One torch thread: on the shared 2-core machine it is several times faster than two.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pairs(toy_root, n, seed=0, n_images=(2, 3)):
    """Pairs like 04's: 'In ImageK, what color is the shape?' -> chosen = ImageK's colour,
    rejected = another image's colour (a sequence-confusion answer). A few rows carry grid /
    no `mia` record so the log's breakdown has several groups."""
    import json
    import random

    rows = json.loads((toy_root / "data" / "toy" / "train.json").read_text())
    rng, pairs = random.Random(seed), []
    while len(pairs) < n:
        k = rng.choice(n_images)
        pick = rng.sample(rows, k)
        t = rng.randrange(k)
        other = [r for j, r in enumerate(pick) if j != t and r["toy"]["color"] != pick[t]["toy"]["color"]]
        if not other:
            continue
        labels = "".join(f"Image{j + 1}:<image>\n" for j in range(k))
        pair = {"id": f"pair-{len(pairs)}", "image": [r["image"] for r in pick],
                "prompt": f"{labels}In Image{t + 1}, what color is the shape?",
                "chosen": pick[t]["toy"]["color"], "rejected": other[0]["toy"]["color"]}
        if len(pairs) % 4 != 3:
            pair["mia"] = {"format": "grid" if len(pairs) % 4 == 2 else "sequence", "n_images": k, "target": t + 1}
        pairs.append(pair)
    return pairs


def write(path, rows):
    """rows -> a JSONL file at `path` (returned)."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_argv(toy, out, *extra, pairs=None):
    """06's command line for a toy dict {pairs, images, model}: the paper's recipe in float32 without
    checkpointing, a tiny LoRA and global batch 2 (tests spell out what they change after these)."""
    return ["--pairs", str(pairs or toy["pairs"]), "--image-root", str(toy["images"]), "--model", str(toy["model"]),
            "--out", str(out), "--recipe", "paper", "--dtype", "float32", "--no-grad-ckpt", "--no-merge", "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "8", "--lora-alpha", "16", "--warmup-steps", "0", "--save-every", "0",
            "--threads", "1", *extra]


def run_main(toy, out, *extra, pairs=None):
    """06's main on dpo_argv(...) -> the rows of OUT/log.jsonl."""
    import importlib

    import common

    dpo = importlib.import_module("06_train_dpo")
    dpo.main(dpo.get_args(dpo_argv(toy, out, *extra, pairs=pairs)))
    return [r for _, r in common.read_rows(out / "log.jsonl")]


def recording_trl_trainer(model_dir, ds, proc, out_dir):
    """TRL's DPOTrainer on `ds` with the settings both parity tests compare against (one global batch
    of 4, 3 steps, AdamW lr 1e-4, linear schedule, clipping 1.0, fp32 on the CPU) -> (trainer, seen):
    `seen` gets loss, rewards and log-probs of every step."""
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-4,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                    max_length=None, use_cpu=True, bf16=False, gradient_checkpointing=False, optim="adamw_torch",
                    remove_unused_columns=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    seen = []

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            m = self._metrics["train"]
            seen.append({"loss": loss.item(), **{k: m[k][-1] for k in ("rewards/chosen", "rewards/rejected",
                                                                       "logps/chosen", "logps/rejected")}})
            return loss

    return Recording(model=str(model_dir), args=cfg, train_dataset=ds, processing_class=proc), seen
