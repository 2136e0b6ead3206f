"""00_make_toy.py (the world) and 00_train_toy.py (the base): files, reload, determinism, reuse,
the merged training loop against the two loops it replaced, and the report against stage 07."""
import hashlib
import importlib
import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import common
import vlm
from conftest import ROOT

world = importlib.import_module("00_make_toy")
base = importlib.import_module("00_train_toy")
ev = importlib.import_module("07_eval")


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _build(root, *extra):
    """Both scripts through their command lines, the way run.sh calls them -> (make run, train run)."""
    runs = []
    for script in ("00_make_toy.py", "00_train_toy.py"):
        runs.append(subprocess.run([sys.executable, str(ROOT / script), "--tiny", "--root", str(root), *extra],
                                   capture_output=True, text=True, cwd=ROOT, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    return runs


def test_toy_world_files_and_format(toy_tiny):
    data = toy_tiny / "data" / "toy"
    train = json.loads((data / "train.json").read_text())
    held = json.loads((data / "heldout.json").read_text())
    assert len(train) >= 90 and len(held) >= 30
    dev = json.loads((data / "dev.json").read_text())
    assert len(dev) >= 15
    ids = [{r["id"] for r in x} for x in (train, dev, held)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for line, row in common.read_rows(data / "train.json"):
        (path,) = common.check_llava_row(row, data / "train.json", line)
        assert common.load_image(data / "images", path).size == (64, 64)
        for t in range(0, len(row["conversations"]), 2):  # each answer is the scene's answer to its question
            q, ans = row["conversations"][t]["value"], row["conversations"][t + 1]["value"]
            assert ans == world.answer(row["toy"], world.asked_of(q))
    asked = [world.asked_of(r["conversations"][t]["value"]) for r in train for t in range(0, len(r["conversations"]), 2)]
    assert set(asked) == set(world.QUESTIONS) and 0.2 < asked.count("describe") / len(asked) < 0.4
    assert all(len(set(asked_row)) == len(asked_row) for asked_row in
               ([world.asked_of(t["value"]) for t in r["conversations"][::2]] for r in train))  # nothing asked twice
    assert {r["image"].split("/")[0] for r in train} == {"plain", "speckled", "striped"}  # sub-datasets
    firsts = [r["conversations"][0]["value"] for r in train]
    assert any(q.startswith("<image>\n") for q in firsts) and any(q.endswith("\n<image>") for q in firsts)
    assert any(q.startswith("Image") and "<image>\nIn Image" in q for q in firsts)  # labelled, one image
    assert any(len(r["conversations"]) == 4 for r in train)
    # the sidecar other stages recognise toy data by, holding the settings 00_train_toy.py reads back
    assert common.is_toy_data(data / "train.json")
    assert world.read_world(data) == {k: getattr(world.get_args(["--tiny"]), k) for k in world.WORLD_SETTINGS}


@pytest.mark.slow
def test_report_counts_what_the_saved_model_answers(toy_tiny):
    """The report's numbers are the saved model's greedy answers, judged by hand (normalised exact match)."""
    model_dir, data = toy_tiny / "models" / "toy-llava", toy_tiny / "data" / "toy"
    report = json.loads((model_dir / "toy_report.json").read_text())
    held = report["heldout"]
    rows = json.loads((data / "heldout.json").read_text())
    a = base.with_world(base.get_args(["--tiny"]), world.read_world(data))
    _, asked = base.examples({"train": [], "heldout": rows}, a)
    assert held["single"]["n"] == sum(len(r["conversations"]) // 2 for r in rows)
    assert [held[f"sequence {n}"]["n"] for n in (2, 3, 4, 5)] == [5] * 4
    assert held["multi-image"]["n"] == 20
    model, proc = vlm.load_model(model_dir, dtype="float32")
    answers = []
    for i in range(0, len(asked), 64):  # the batches the report was made with (a tiny model's ties could flip)
        ex = asked[i : i + 64]
        answers += vlm.generate(model, proc, [e["q"] for e in ex],
                                   [[common.load_image(data / "images", p) for p in e["images"]] for e in ex], max_new_tokens=8)
    singles = [(x, e) for x, e in zip(answers, asked) if len(e["images"]) == 1]
    right = [common.normalise_answer(x) == e["a"] for x, e in singles]
    assert len(right) == held["single"]["n"]
    assert held["single"]["accuracy"] == pytest.approx(sum(right) / len(right))
    for kind in {e["kind"] for _, e in singles}:
        mine = [ok for ok, (_, e) in zip(right, singles) if e["kind"] == kind]
        assert held[f"single/{kind}"] == {**held[f"single/{kind}"], "n": len(mine), "accuracy": pytest.approx(sum(mine) / len(mine))}
    wrong = len(right) - sum(right)
    assert sum(held["single"].get("errors", {}).values()) == wrong  # every wrong single answer is typed
    assert held["single"].get("errors", {}).get("sequence confusion", 0) == 0  # one image: nothing to confuse it with


def test_summary_hand_case():
    """Stage 07's summary, the single-image kinds on their own, the sequence-confusion share."""
    scenes = [{"color": "red", "background": "gray"}, {"color": "blue", "background": "white"}]
    one = {"q": "<image>\nWhat color is the shape?", "a": "red", "kind": "color", "images": ["a.png"],
           "scenes": scenes[:1], "target": 0, "attr": "color"}
    lab = {**one, "kind": "labelled background", "a": "gray", "attr": "background"}
    seq = {"q": "...", "a": "red", "kind": "sequence 2", "images": ["a.png", "b.png"], "scenes": scenes,
           "target": 0, "attr": "color"}
    answered = [(one, "Red."), (one, "gray"), (lab, "gray"), (seq, "red"), (seq, "blue"), (seq, "blue"), (seq, "green")]
    recs = [{**ev.score(base.as_question(e, str(i)), x), "kind": e["kind"]} for i, (e, x) in enumerate(answered)]
    s = base.summary(recs, ev.summarise)
    assert list(s) == ["single", "single/color", "single/labelled background", "sequence 2", "multi-image"]
    assert (s["single"]["n"], s["single"]["accuracy"]) == (3, pytest.approx(2 / 3))
    assert s["single"]["errors"] == {"sequence confusion": 0, "element interference": 1, "other": 0}  # gray: the background
    assert (s["single/color"]["accuracy"], s["single/labelled background"]["accuracy"]) == (0.5, 1.0)
    assert s["sequence 2"]["errors"] == {"sequence confusion": 2, "element interference": 0, "other": 1}
    assert s["sequence 2"]["accuracy"] == 0.25 and s["sequence 2"]["sequence_confusion_share_of_errors"] == pytest.approx(2 / 3)
    assert "sequence_confusion_share_of_errors" not in s["single/labelled background"]  # no errors, no share


def test_saved_model_reloads_like_a_downloaded_checkpoint(toy_tiny):
    path = toy_tiny / "models" / "toy-llava"
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    im = common.load_image(toy_tiny / "data" / "toy" / "images", "plain/plain-000000.png")
    enc = proc(text=["USER: <image>\nWhat color is the shape? ASSISTANT:"], images=[[im]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(proc.tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_same_seed_same_world_and_weights_and_reuse(toy_tiny, tmp_path):
    _build(tmp_path)
    for sub in ("plain", "speckled", "striped"):  # what 00 writes (other tests add folders beside them)
        assert _tree_hash(tmp_path / "data" / "toy" / "images" / sub) == _tree_hash(toy_tiny / "data" / "toy" / "images" / sub)
    for f in ("train.json", "dev.json", "heldout.json"):
        assert (tmp_path / "data" / "toy" / f).read_bytes() == (toy_tiny / "data" / "toy" / f).read_bytes()
    a = load_file(tmp_path / "models" / "toy-llava" / "model.safetensors")
    b = load_file(toy_tiny / "models" / "toy-llava" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    make, train = _build(tmp_path)
    assert "reusing" in make.stdout and "reusing" in train.stdout and "single" in train.stdout


@pytest.mark.slow
def test_the_world_decides_the_base(tmp_path, capsys):
    """00_train_toy.py reads the seed from the world's sidecar: no world, a clear stop; another
    world, another base (the model of the old world is not reused)."""
    tiny = ["--tiny", "--root", str(tmp_path)]
    with pytest.raises(SystemExit, match="00_make_toy.py"):
        base.main(base.get_args(tiny))
    a = base.get_args(tiny)
    a.steps = 4  # any training will do: the seeds differ
    world.main(world.get_args(tiny))
    base.main(a)
    first = load_file(tmp_path / "models" / "toy-llava" / "model.safetensors")
    world.main(world.get_args(tiny + ["--seed", "1"]))
    assert "another world (seed 0)" in capsys.readouterr().out
    report = base.main(a)
    assert "reusing" not in capsys.readouterr().out and report["settings"]["seed"] == 1
    second = load_file(tmp_path / "models" / "toy-llava" / "model.safetensors")
    assert first.keys() == second.keys() and not all(torch.equal(first[k], second[k]) for k in first)


def test_another_seed_another_world():
    a = world.make_row(0, "plain", 1, 0.25, 0.3)
    assert a == world.make_row(0, "plain", 1, 0.25, 0.3) and a["id"] == "plain-000001"
    assert any(world.make_row(1, "plain", i, 0.25, 0.3)["toy"] != world.make_row(0, "plain", i, 0.25, 0.3)["toy"] for i in range(5))


def test_answers_and_what_a_question_asks_hand_cases():
    scene = {"shape": "circle", "color": "red", "background": "gray"}
    assert [world.answer(scene, k) for k in ("color", "background", "describe")] == ["red", "gray", "a red shape on gray"]
    assert world.asked_of("Image2:<image>\nIn Image2, describe the image.") == "describe"
    assert world.asked_of("What does the image show?\n<image>") == "describe"
    assert world.asked_of("<image>\nWhat is the color of the background?") == "background"
    assert world.asked_of("Image1:<image>\nImage2:<image>\nIn Image1, what color is the shape?") == "color"
    with pytest.raises(ValueError, match="not a toy question"):
        world.asked_of("<image>\nHow many shapes?")
    rows = [world.make_row(0, "plain", i, 0.25, 0.0) for i in range(20)]  # share 0: one-word answers only
    assert all(world.asked_of(t["value"]) != "describe" for r in rows for t in r["conversations"][::2])


def test_sequence_examples_ask_about_the_labelled_image(toy_tiny):
    rows = json.loads((toy_tiny / "data" / "toy" / "train.json").read_text())
    ex = base.sequence_examples(0, rows, 4, [2, 5], "t")
    assert ex == base.sequence_examples(0, rows, 4, [2, 5], "t") and len(ex) == 8
    by_path = {r["image"]: r["toy"] for r in rows}
    for e in ex:
        n = len(e["images"])
        assert e["kind"] == f"sequence {n}" and len(set(e["images"])) == n
        assert e["q"].startswith("".join(f"Image{j}:<image>\n" for j in range(1, n + 1)))
        k = int(re.search(r"In Image(\d), ", e["q"]).group(1))
        assert e["target"] == k - 1 and e["attr"] == world.asked_of(e["q"])
        assert e["scenes"] == [by_path[p] for p in e["images"]] and e["a"] == world.answer(e["scenes"][k - 1], e["attr"])


def test_text_prior_examples_bind_the_label_to_its_span():
    rng = random.Random(0)
    for n_tokens in (2, 4, 16):
        for _ in range(20):
            ex = base.text_prior_example(rng, 3, n_tokens)
            lines = ex["q"].split("\n")
            k = int(lines[-1].split(",")[0].removeprefix("In Image"))
            span = lines[k - 1].split(": ", 1)[1].split()
            assert lines[k - 1].startswith(f"Image{k}: ") and len(span) == n_tokens
            scene = ex["scenes"][k - 1]
            assert ex["a"] == world.answer(scene, world.asked_of(lines[-1]))
            assert scene["color"] in span and (n_tokens < 4 or span.count(scene["background"]) >= 1)


def test_curriculum_and_schedules_hand_cases():
    c = base.Curriculum(3, 4, "keep")
    assert [c.update(1.0) for _ in range(10)][-1] and (c.n_max, c.span) == (3, 2)
    assert not any(c.update(0.0) for _ in range(30))  # below 0.9: stays
    # the last 10 steps' mean reaches 0.9 at the 9th 1.0: then the span grows and the window empties
    assert [c.update(1.0) for _ in range(10)] == [False] * 8 + [True, False] and (c.n_max, c.span) == (3, 4)
    assert not any(c.update(1.0) for _ in range(30)) and c.learned  # nothing left to grow: learned
    c.update(0.0), c.update(0.0)
    assert not c.learned and (c.n_max, c.span) == (3, 4)  # the last 10 average 0.8
    r = base.Curriculum(3, 4, "reset")
    [r.update(0.95) for _ in range(20)]
    assert (r.n_max, r.span) == (2, 4)  # longer spans start again at 2 items
    assert (base.Curriculum(5, 4, "").span, base.Curriculum(5, 16, "keep").lengths) == (4, [2, 4, 9, 16])
    assert base.lr_factor("prior", 24, 30, 600) == 0.5 and base.lr_factor("prior", 400, 30, 600) == 1.0
    assert base.lr_factor("visual", 14, 30, 600) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 14 / 600)))
    assert base.lr_factor("visual", 300, 30, 600) == pytest.approx(0.5) and base.lr_factor("visual", 600, 30, 600) == 0.0


def _reference_two_loops(model, proc, data, a):
    """The base's training as 00_make_toy.py did it before the merge, in its two loops (the text
    prior's, then alignment + SFT's), line for line: the reference the merged loop must equal."""
    n_tokens = base.span_length(a)
    rng = random.Random(a.seed + 17)
    params = base.lm_params(model)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    lengths = [L for L in (2, 4, 9, 16, 25, 36, 64) if L < n_tokens] + [n_tokens]
    li = 0 if a.span_curriculum else len(lengths) - 1
    n_max, hist, reached = 2, [], []
    model.train()
    for step in range(a.text_prior_steps):
        batch, firsts = base.text_batch(proc, rng, n_max, a.text_batch_size, lengths[li], a.text_questions)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = base.answer_accuracy(out.logits.detach(), batch, firsts, n_max)
        hist = (hist + [acc])[-10:]
        if len(hist) == 10 and sum(hist) / 10 >= 0.9 and (n_max < a.max_images or li < len(lengths) - 1):
            if n_max < a.max_images:
                n_max = n_max + 1
            else:
                li, n_max = li + 1, 2 if a.span_curriculum == "reset" else n_max
            hist = []
            reached.append((n_max, lengths[li]))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
    g = torch.Generator().manual_seed(a.seed)
    n = data["input_ids"].shape[0]
    lm = base.lm_params(model)
    trng = random.Random(a.seed + 29)
    n_text = round(a.batch_size * a.text_mix)
    for step in range(a.steps):
        frozen = step < a.freeze_lm_steps
        for p in lm:
            p.requires_grad_(not frozen)
        idx = torch.randint(n, (a.batch_size,), generator=g)
        T = int(data["attention_mask"][idx].sum(1).max())
        batch = {k: data[k][idx, :T] for k in ("input_ids", "attention_mask", "labels")}
        batch["pixel_values"] = torch.cat([data["pixel_values"][i] for i in idx.tolist()])
        loss = model(**batch).loss
        if n_text and not frozen:
            tb, _ = base.text_batch(proc, trng, a.max_images, n_text, n_tokens, a.text_questions)
            loss = loss + a.text_mix * model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=tb["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        sched.step()
    return reached


@pytest.mark.slow
def test_merged_loop_equals_the_two_loops_it_replaced(toy_tiny, monkeypatch):
    """Every phase (a prior whose curriculum grows, frozen-LM steps, SFT with the text mix) on a tiny
    build: the merged loop's weights equal the old two loops' bit for bit."""
    a = base.with_world(base.get_args(["--tiny"]), world.read_world(toy_tiny / "data" / "toy"))
    a.patch, a.text_prior_steps, a.text_batch_size, a.text_questions = 32, 25, 8, 2
    a.freeze_lm_steps, a.steps, a.batch_size, a.text_mix = 3, 8, 8, 0.25
    # subtle: a tiny model never reaches 0.9, so the accuracy is read as 1.0 (by both loops): the
    # curriculum then grows at steps 9 and 19, and the batches after it change shape
    a.text_prior_max_steps = a.text_prior_steps  # exactly 25 prior steps, as the two loops ran
    real = base.answer_accuracy
    monkeypatch.setattr(base, "answer_accuracy", lambda *x: 1.0 if real(*x) >= 0 else 0.0)
    train_ex = [e for r in world.read_split(toy_tiny / "data" / "toy", "train")[:30] for e in base.turn_examples(r)]
    tokenizer = base.build_tokenizer(base.tokenizer_texts(train_ex, a))
    weights = []
    for merged in (True, False):
        model, proc = base.build_model(tokenizer, a)
        data = base.encode_all(proc, train_ex, toy_tiny / "data" / "toy" / "images")
        if merged:
            model, log, _ = base.train_base(model, base.phases(model, proc, data, a), a, log_every=1)
            reached = sorted({(r["n_max"], r["span"]) for r in log if r["phase"] == "text prior"})
        else:
            assert _reference_two_loops(model, proc, data, a) == [(3, 2), (4, 2)] == reached[1:]
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert [r["phase"] for r in log].count("align") == 3 and [r["phase"] for r in log].count("sft") == 5
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_prior_runs_until_its_curriculum_is_learned(toy_tiny, monkeypatch):
    """At least --text-prior-steps, then until the curriculum's last notch averages 0.9, at most
    --text-prior-max-steps: with every answer right the notches come every 10 steps, (2, 2) ->
    (3, 2) -> (4, 2) -> (5, 2) -> (5, 4), learned 10 steps later; with none right, the cap."""
    a = base.with_world(base.get_args(["--tiny"]), world.read_world(toy_tiny / "data" / "toy"))
    a.patch, a.text_prior_steps, a.text_prior_max_steps, a.text_batch_size, a.text_questions, a.steps = 32, 5, 80, 4, 1, 0
    train_ex = [e for r in world.read_split(toy_tiny / "data" / "toy", "train")[:10] for e in base.turn_examples(r)]
    tokenizer = base.build_tokenizer(base.tokenizer_texts(train_ex, a))
    for acc, steps, learned in ((1.0, 50, True), (0.0, 80, False)):
        monkeypatch.setattr(base, "answer_accuracy", lambda *x, acc=acc: acc)
        model, proc = base.build_model(tokenizer, a)
        _, log, _ = base.train_base(model, base.phases(model, proc, {}, a), a, log_every=1000)
        assert (log[-1]["step"] + 1, log[-1]["n_max"], log[-1]["span"], log[-1]["learned"]) == (steps, 5 if acc else 2, 4 if acc else 2, learned)


@pytest.mark.slow
def test_every_training_phase_runs_and_is_logged(tmp_path):
    """The language prior, the frozen-LM alignment steps and the text mix, briefly, through main()."""
    world.main(world.get_args(["--tiny", "--root", str(tmp_path)]))
    a = base.get_args(["--tiny", "--root", str(tmp_path)])
    a.text_prior_steps, a.freeze_lm_steps, a.text_mix, a.text_questions, a.steps = 4, 3, 0.25, 2, 8
    a.text_prior_max_steps = 4
    report = base.main(a)
    assert [r["step"] for r in report["text_prior_log"]] == [0, 3]
    assert [(r["phase"], r["step"]) for r in report["train_log"]] == [("align", 0), ("align", 2), ("sft", 3), ("sft", 7)]
    assert set(report["seconds"]) == {"encode", "text prior", "align", "sft", "eval"}
    assert report["settings"]["text_prior_steps"] == 4 and (tmp_path / "models/toy-llava/config.json").is_file()
    assert common.is_toy_data(tmp_path / "data/toy/train.json")  # in-process too: the sidecar names 00_make_toy.py
    assert base.committed_base(base.with_world(a, world.read_world(tmp_path / "data/toy"))) is None  # tiny: never


def test_committed_base_is_used_only_for_its_own_settings():
    if not (base.COMMITTED_BASE / "config.json").is_file():
        pytest.skip("no committed base in this checkout")
    defaults = {k: getattr(world.get_args([]), k) for k in world.WORLD_SETTINGS}
    a = base.with_world(base.get_args([]), defaults)
    assert base.committed_base(a) == base.COMMITTED_BASE
    settings = json.loads((base.COMMITTED_BASE / "toy_report.json").read_text())["settings"]
    assert all(settings[k] == getattr(a, k) for k in base.WEIGHT_SETTINGS)
    a.lr = a.lr * 2
    assert base.committed_base(a) is None
    assert base.committed_base(base.with_world(base.get_args([]), {**defaults, "seed": 1})) is None
    assert base.committed_base(base.with_world(base.get_args(["--threads", "1", "--eval-split", "dev"]), defaults))
