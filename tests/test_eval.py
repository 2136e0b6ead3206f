"""07_eval.py / 07_eval.sh: scoring, the hallucination breakdown, multiple-choice parsing, the
toy benchmark through the shell script, resume."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common
import vlm

ev = importlib.import_module("07_eval")
ROOT = Path(__file__).resolve().parents[1]
SCENES = [{"shape": "circle", "color": "red", "background": "gray"},
          {"shape": "square", "color": "blue", "background": "white"},
          {"shape": "cross", "color": "red", "background": "black"}]


@pytest.mark.parametrize("answer,choice", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b) dog", "B"), ("(c) bird", "C"), ("C: bird", "C"),
    ("dog", "B"), ("A dog.", "B"),  # "A" here is the article: the text names option B
    ("a dog", "B"), ("The answer is C.", "C"), ("Dog", "B"),
    ("cat or dog", None), ("", None), ("E", None), ("A or B", None), ("I think so", None),
])
def test_parse_choice_hand_cases(answer, choice):
    assert ev.parse_choice(answer, ["cat", "dog", "bird"]) == choice


def test_mc_prompt_places_images_and_options():
    p = common.mc_prompt("Which image shows a dog?", 2, ["the first", "the second"])
    assert p == ("<image>\n<image>\nWhich image shows a dog?\nA. the first\nB. the second\n"
                 "Answer with the option's letter from the given choices directly.")
    assert common.mc_prompt("<image> vs <image>: same?", 2, ["yes", "no"]).startswith("<image> vs")
    row = {"id": 1, "images": ["a.png", "b.png"], "question": "Which image shows a dog?", "options": ["the first", "the second"],
           "answer": "B"}
    assert ev.row_question(row, "mc.jsonl", 1, {})["question"] == p  # how 07_eval.py asks a multiple-choice row


@pytest.mark.parametrize("answer,target,attr,kind", [
    ("blue", 0, "color", "sequence confusion"),    # Image2's shape colour, asked about Image1
    ("red", 1, "color", "sequence confusion"),     # Image1's and Image3's
    ("gray", 0, "color", "element interference"),  # the target's own background
    ("white", 0, "color", "element interference"),  # another image's background
    ("square", 0, "color", "element interference"),  # a shape, not a colour
    ("green", 0, "color", "other"), ("", 1, "background", "other"),
    ("gray", 1, "background", "sequence confusion"),
    ("Blue.", 0, "color", "sequence confusion"),   # normalised first
])
def test_hallucination_type_hand_cases(answer, target, attr, kind):
    assert ev.hallucination_type(answer, SCENES, target, attr) == kind


def test_score_and_summarise_hand_case():
    q = {"key": "f:1", "id": "1", "kind": "open", "group": "sequence 3", "gold": "red", "scenes": SCENES,
         "target": 0, "attr": "color"}
    right, conf, other = ev.score(q, "Red"), ev.score(q, "blue"), ev.score(q, "green")
    assert right["correct"] and right["type"] is None
    assert right["random_image"] == pytest.approx(2 / 3)  # Image1 and Image3 are red
    assert (conf["correct"], conf["type"], other["type"]) == (False, "sequence confusion", "other")
    single = {**q, "key": "f:2", "group": "single", "scenes": SCENES[:1]}
    blue = ev.score({**q, "key": "f:3", "target": 1, "gold": "blue"}, "blue")  # right; only Image2 is blue
    assert blue["random_image"] == pytest.approx(1 / 3)
    recs = [right, conf, other, blue, ev.score(single, "red")]
    s = ev.summarise(recs)
    assert list(s) == ["single", "sequence 3", "multi-image"]
    # random-image is over every question of the group, right answers too: (3 x 2/3 + 1/3) / 4
    assert s["sequence 3"] == {"n": 4, "accuracy": pytest.approx(2 / 4), "random_image_accuracy": pytest.approx(7 / 12),
                               "errors": {"sequence confusion": 1, "element interference": 0, "other": 1}}
    assert s["multi-image"]["n"] == 4 and s["single"]["accuracy"] == 1.0
    mc = {"key": "m:1", "id": "1", "kind": "mc", "group": "blink", "gold": "B", "options": ["cat", "dog"]}
    assert ev.score(mc, "(B)")["correct"] and not ev.score(mc, "cat")["correct"]
    assert "errors" not in ev.summarise([ev.score(mc, "B")])["blink"]


def test_pair_summary_hand_case():
    pairs = [{"group": "sequence 2"}, {"group": "sequence 3"}, {"group": "single"}]
    s = ev.pair_summary(pairs, [-1.0, -3.0, -0.5], [-2.0, -1.0, -0.5], ref=([-2.0, -2.0, -1.0], [-1.0, -1.0, -0.2]))
    assert list(s) == ["single", "sequence", "all"]
    assert s["sequence"]["preference_accuracy"] == 0.5 and s["single"]["preference_accuracy"] == 0.0  # a tie is not a win
    assert s["sequence"]["chosen_change"] == 0.0 and s["sequence"]["rejected_change"] == -0.5
    assert s["sequence"]["reward_accuracy"] == 0.5  # pair 1: +1 vs -1; pair 2: -1 vs 0
    assert s["all"]["n"] == 3 and s["all"]["reward_accuracy"] == pytest.approx(2 / 3)  # single: +0.5 vs -0.3
    assert "chosen_change" not in ev.pair_summary(pairs, [0.0] * 3, [0.0] * 3)["all"]


def _row(rid, images, q, a, mia=None):
    r = {"id": rid, "image": images, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    return {**r, "mia": mia} if mia else r


def test_row_question_targets_and_groups():
    scene_of = {"a.png": SCENES[0], "b.png": SCENES[1], "c.png": SCENES[2]}
    seq = ev.row_question(_row("s", ["b.png", "a.png"], "Image1:<image>\nImage2:<image>\nIn Image2, what color is the background?",
                               "gray", {"format": "sequence", "n_images": 2, "target": 2}), "f", 1, scene_of)
    assert (seq["group"], seq["target"], seq["attr"]) == ("sequence 2", 1, "background")
    grid = ev.row_question(_row("g", ["grid.jpg"], "<image>\nIn Image3, what color is the shape?", "red",
                                {"format": "grid", "n_images": 3, "target": 3, "cell_images": ["a.png", "b.png", "c.png"]}),
                           "f", 2, scene_of)
    assert (grid["group"], grid["target"], len(grid["scenes"])) == ("grid 3", 2, 3)
    pip = ev.row_question(_row("p", ["pip.jpg"], "<image>\nFor the inset, what color is the shape?", "blue",
                               {"format": "pip", "n_images": 2, "target": 1, "source_images": ["b.png"], "companions": ["a.png"]}),
                          "f", 3, scene_of)
    assert (pip["group"], pip["target"], pip["scenes"][1]) == ("pip 2", 0, SCENES[0])
    single = ev.row_question(_row("1", "c.png", "Image4:<image>\nIn Image4, what color is the shape?", "red"), "f", 4, scene_of)
    assert (single["group"], single["target"]) == ("single", 0)  # a labelled single image: still its only image
    unknown = ev.row_question(_row("u", ["x.png", "y.png"], "<image><image>\nWhich?", "red"), "f", 5, scene_of)
    assert unknown["group"] == "multi 2" and "scenes" not in unknown


def test_mc_rows_and_their_errors(tmp_path):
    f = tmp_path / "mc.jsonl"
    rows = [{"id": 1, "images": ["a.png", "b.png"], "question": "Same colour?", "options": ["yes", "no"], "answer": "no"},
            {"id": 2, "images": "a.png", "question": "Colour?", "options": {"A": "red", "B": "blue"}, "answer": "A", "group": "g"},
            {"id": 3, "images": ["a.png"], "question": "Colour?", "options": ["red", "blue"], "answer": "green"},
            {"id": 4, "images": ["a.png"], "question": "Colour?", "options": ["red"], "answer": "A"},
            {"id": 2, "images": ["b.png"], "question": "Again?", "options": ["red", "blue"], "answer": "B"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(common.DataError, match=r"mc.jsonl:3: answer"):
        ev.load_questions([f], [], "raise", common.Skips())
    skips = common.Skips()
    qs = ev.load_questions([f], [], "skip", skips)
    assert [(q["gold"], q["group"]) for q in qs] == [("B", "mc"), ("A", "g")]
    assert len(skips) == 3 and skips.rows[1]["line"] == 4 and "options" in skips.rows[1]["reason"]
    assert skips.rows[2]["line"] == 5 and "repeats an earlier row's id" in skips.rows[2]["reason"]


def test_resolve_model_layouts(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert vlm.resolve_model(tmp_path / "m") == (tmp_path / "m", None)
    (tmp_path / "o" / "adapter").mkdir(parents=True)
    (tmp_path / "o" / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/base"}))
    assert vlm.resolve_model(tmp_path / "o") == (Path("models/base"), tmp_path / "o" / "adapter")
    (tmp_path / "o" / "final").mkdir()
    (tmp_path / "o" / "final" / "config.json").write_text("{}")
    assert vlm.resolve_model(tmp_path / "o") == (tmp_path / "o" / "final", None)  # merged beats adapter
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        vlm.resolve_model(tmp_path)


def _env():
    return {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_shell_builds_the_benchmark_and_compares_two_models(toy_tiny):
    run = subprocess.run(["bash", str(ROOT / "07_eval.sh"), "--threads", "1"], cwd=toy_tiny, capture_output=True,
                         text=True, timeout=300, env={**_env(), "DPO": "models/toy-llava", "OUT": "out/e"})
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((toy_tiny / "out/e/report.json").read_text())
    assert list(report) == ["base", "dpo"]
    groups = report["base"]["groups"]
    assert {"single", "sequence 2", "sequence 5", "pip 2", "multi-image"} <= set(groups)
    assert groups["single"]["n"] == 30 and groups["multi-image"]["n"] == 90  # 30 held-out rows, one question each per format
    assert report["base"]["groups"] == report["dpo"]["groups"]  # the same model twice
    n_err = sum(sum(g["errors"].values()) for k, g in groups.items() if k != "multi-image")
    assert n_err == sum(round(g["n"] * (1 - g["accuracy"])) for k, g in groups.items() if k != "multi-image")
    answers = [json.loads(x) for x in (toy_tiny / "out/e/answers-base.jsonl").read_text().splitlines()]
    assert len(answers) == 120 and all(set(a) >= {"id", "group", "gold", "answer", "correct"} for a in answers)
    assert "group" in run.stdout and "wrong answers by type" in run.stdout and "held-out pairs" in run.stdout
    n_wrong = sum(not a["correct"] and a["answer"].strip() != "" for a in answers)
    pairs = report["dpo"]["pairs"]
    assert pairs["all"]["n"] == n_wrong and list(pairs)[-1] == "all"
    assert pairs["all"]["chosen_change"] == 0 and pairs["all"]["reward_accuracy"] == 0  # the same model: nothing moved
    assert report["base"]["pairs"]["all"]["preference_accuracy"] == pairs["all"]["preference_accuracy"]
    assert not list((toy_tiny / "out/e").glob("*.partial"))


def test_resume_after_a_crash_gives_the_same_answers(toy_tiny, tmp_path, monkeypatch):
    data = [str(toy_tiny / "data/toy/heldout.json")]
    args = ["--model", f"m={toy_tiny / 'models/toy-llava'}", "--image-root", str(toy_tiny / "data/toy/images"),
            "--scenes", *data, "--batch-size", "8", "--data", *data]
    ev.main(ev.get_args(args + ["--out", str(tmp_path / "a")]))
    calls, real = [], vlm.generate

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(vlm, "generate", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        ev.main(ev.get_args(args + ["--out", str(tmp_path / "b")]))
    partial = tmp_path / "b" / "answers-m.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 1 + 16  # the config line, two batches of 8
    monkeypatch.setattr(vlm, "generate", real)
    ev.main(ev.get_args(args + ["--out", str(tmp_path / "b")]))
    assert (tmp_path / "a/answers-m.jsonl").read_text() == (tmp_path / "b/answers-m.jsonl").read_text()
    assert not partial.exists()
    partial.write_text(json.dumps({"resume": {"model": "another"}}) + "\n")
    with pytest.raises(SystemExit, match="other inputs or settings"):
        ev.main(ev.get_args(args + ["--out", str(tmp_path / "b")]))




# ---- several attributes in one answer (element interference across images) ----------------------
MULTI = [{"shape": "circle", "color": "red", "background": "gray"},     # Image1, the target below
         {"shape": "square", "color": "blue", "background": "white"},   # Image2
         {"shape": "cross", "color": "green", "background": "black"}]   # Image3


@pytest.mark.parametrize("answer,kind", [
    ("a blue shape on white", "sequence confusion"),    # all of Image2
    ("a green shape on black", "sequence confusion"),   # all of Image3
    ("a blue shape on gray", "element interference"),   # Image2's shape colour + Image1's background
    ("a blue shape on black", "element interference"),  # Image2's shape colour + Image3's background
    ("a gray shape on red", "element interference"),    # Image1's colours in each other's slot
    ("a white shape on blue", "element interference"),  # Image2's colours, slots swapped: not one image
    ("a purple shape on gray", "other"),                # purple is in no image
    ("a red shape on brown", "other"),                  # brown is in no image
    ("a red shape", "other"),                           # only the target's own attribute: incomplete, not a mix
    ("nothing here", "other"),                          # no attribute named
    ("blue and white", "sequence confusion"),           # not the gold's wording: read word by word, Image2
    ("blue and black", "element interference"),         # word by word: Image2 + Image3
])
def test_hallucination_type_multi_hand_cases(answer, kind):
    vocab = ("red", "green", "blue", "purple", "gray", "white", "black", "brown", "circle", "square", "cross")
    mentions = ev.answer_attributes(answer, "a red shape on gray", MULTI[0], ["color", "background"], MULTI, vocab)
    assert ev.hallucination_type_multi(mentions, MULTI, 0) == kind


def test_answer_attributes_reads_the_gold_template():
    f = ev.answer_attributes
    assert f("A gray shape on red.", "a red shape on gray", MULTI[0], ["color", "background"], MULTI) == \
        [("gray", {"color"}), ("red", {"background"})]
    # another wording: each word gets the slots its value has in the prompt; a vocab word in no image none
    assert f("blue, on purple", "a red shape on gray", MULTI[0], ["color", "background"], MULTI, ["purple"]) == \
        [("blue", {"color"}), ("purple", set())]


@pytest.mark.parametrize("answer,target,attr,kind", [
    ("blue", 0, "color", "sequence confusion"), ("red", 1, "color", "sequence confusion"),
    ("gray", 0, "color", "element interference"), ("white", 0, "color", "element interference"),
    ("square", 0, "color", "element interference"), ("green", 0, "color", "other"), ("", 1, "background", "other"),
    ("gray", 1, "background", "sequence confusion"), ("Blue.", 0, "color", "sequence confusion"),
])
def test_one_word_answers_classify_the_same_both_ways(answer, target, attr, kind):
    a = common.normalise_answer(answer)
    mentions = [(a, {attr})] if a else []
    assert ev.hallucination_type_multi(mentions, SCENES, target) == ev.hallucination_type(answer, SCENES, target, attr) == kind


def test_row_question_and_score_for_a_multi_attribute_answer():
    scene_of = {"a.png": MULTI[0], "b.png": MULTI[1]}
    q = ev.row_question(_row("m", ["a.png", "b.png"], "Image1:<image>\nImage2:<image>\nIn Image1, describe it.",
                             "a red shape on gray", {"format": "sequence", "n_images": 2, "target": 1}), "f", 1, scene_of)
    assert (q["target"], q["attrs"]) == (0, ["color", "background"]) and "attr" not in q
    q["key"] = "f:m"
    assert ev.score(q, "a red shape on gray")["correct"]
    r = ev.score(q, "a blue shape on gray")
    assert (r["correct"], r["type"], r["random_image"]) == (False, "element interference", 0.5)
    assert ev.score(q, "a blue shape on white")["type"] == "sequence confusion"


def test_summarise_splits_one_word_from_describe_answers():
    """A group holding both kinds reports each apart (by_answer); its pooled numbers are unchanged."""
    scene_of = {"a.png": MULTI[0], "b.png": MULTI[1]}
    mia = {"format": "sequence", "n_images": 2, "target": 1}
    head = "Image1:<image>\nImage2:<image>\nIn Image1, "
    qd = {**ev.row_question(_row("d", ["a.png", "b.png"], head + "describe it.", "a red shape on gray", mia), "f", 1, scene_of), "key": "f:d"}
    qc = {**ev.row_question(_row("c", ["a.png", "b.png"], head + "what color is the shape?", "red", mia), "f", 2, scene_of), "key": "f:c"}
    recs = [ev.score(qd, "a red shape on gray"), ev.score(qd, "a blue shape on gray"), ev.score(qd, "a blue shape on white"),
            ev.score(qc, "red"), ev.score(qc, "blue")]
    s = ev.summarise(recs)["sequence 2"]
    assert (s["n"], s["accuracy"]) == (5, 0.4)
    assert s["errors"] == {"sequence confusion": 2, "element interference": 1, "other": 0}
    assert s["by_answer"] == {
        "one word": {"n": 2, "accuracy": 0.5, "errors": {"sequence confusion": 1, "element interference": 0, "other": 0}},
        "attributes": {"n": 3, "accuracy": pytest.approx(1 / 3),
                       "errors": {"sequence confusion": 1, "element interference": 1, "other": 0}}}
    assert "by_answer" not in ev.summarise(recs[3:])["sequence 2"]  # one-word answers only: no split


# ---- probability mass at the answer ----------------------------------------------------------
def test_mass_split_hand_case():
    scenes = [{"shape": "circle", "color": "red", "background": "gray"},
              {"shape": "square", "color": "blue", "background": "white"},
              {"shape": "cross", "color": "red", "background": "gray"}]
    vocab = ["red", "green", "blue", "yellow", "gray", "white", "black"]
    p = {"red": 0.4, "green": 0.05, "blue": 0.2, "yellow": 0.01, "gray": 0.1, "white": 0.04, "black": 0.1}  # rest .1
    m = ev.mass_split(p, scenes, 0, "color", vocab, rejected="Blue")
    # truth: red (Image1; Image3's red is the same word, so it is truth, not confusion)
    # other images: blue; other attributes: gray + white; no image: green + yellow + black
    assert m == pytest.approx({"truth": 0.4, "other_images": 0.2, "other_attributes": 0.14, "no_image": 0.16,
                               "rest": 0.1, "vocab": 0.9, "rejected": 0.2})
    b = ev.mass_split(p, scenes, 1, "background", vocab)  # asked Image2's background: white
    assert b == pytest.approx({"truth": 0.04, "other_images": 0.1, "other_attributes": 0.6, "no_image": 0.16,
                               "rest": 0.1, "vocab": 0.9})
    single = ev.mass_split(p, scenes[:1], 0, "color", vocab)  # one image: nothing can be another image's
    assert single["other_images"] == 0 and single["other_attributes"] == pytest.approx(0.1)
    assert single["no_image"] == pytest.approx(0.4)  # green, blue, yellow, white, black


def test_mass_summary_pools_formats():
    recs = [{"group": g, "truth": t, "other_images": 0.0, "other_attributes": 0.0, "no_image": 0.0, "rest": 1 - t,
             "vocab": t, **({"rejected": 0.5} if g == "sequence 3" else {})}
            for g, t in (("single", 1.0), ("sequence 2", 0.5), ("sequence 3", 0.3), ("pip 2", 0.2))]
    s = ev.mass_summary(recs)
    assert list(s) == ["single", "sequence 2", "sequence 3", "sequence", "pip 2", "multi-image"]  # pip has one size
    assert s["sequence"]["truth"] == pytest.approx(0.4) and s["multi-image"]["n"] == 3
    assert (s["sequence"]["rejected"], s["sequence"]["n_rejected"], s["single"]["rejected"]) == (0.5, 1, None)


def test_mass_is_a_partition_and_the_truth_is_its_log_prob(toy_tiny, tmp_path):
    """End to end on the tiny world: every question's five masses sum to 1, and the truth's mass
    is exp(log-prob) of the truth's tokens from an independent response_logps call (the first token
    for a one-token truth; the tiny tokenizer splits most colours, whose mass is the product)."""
    import torch

    data = [str(toy_tiny / "data/toy/heldout.json")]
    args = ev.get_args(["--model", f"m={toy_tiny / 'models/toy-llava'}", "--image-root", str(toy_tiny / "data/toy/images"),
                        "--scenes", *data, "--data", *data, "--batch-size", "8", "--out", str(tmp_path), "--no-pairs"])
    before = dict(vars(args))
    report = ev.main(args)
    assert vars(args) == before  # main reads the flags, never rewrites them (the sidecar records them as given)
    mass = [json.loads(x) for x in (tmp_path / "mass-m.jsonl").read_text().splitlines()]
    one_word = [r for r in json.loads((toy_tiny / "data/toy/heldout.json").read_text())
                if " " not in r["conversations"][1]["value"]]  # describe answers get no mass split
    assert 0 < len(one_word) < 30 and len(mass) == report["m"]["mass"]["single"]["n"] == len(one_word)
    for r in mass:
        assert sum(r[k] for k in ("truth", "other_images", "other_attributes", "no_image", "rest")) == pytest.approx(1, abs=1e-5)
        assert 0 <= r["truth"] <= r["vocab"] <= 1 + 1e-9
    model, proc = vlm.load_model(toy_tiny / "models/toy-llava")
    qs = {q["key"]: q for q in ev.load_questions(data, data, "raise", common.Skips())}
    tok_ids = ev.answer_token_ids(proc, next(iter(qs.values()))["question"], ev.answer_vocab(list(qs.values())))
    one = [r for r in mass if len(tok_ids[qs[r["key"]]["gold"]]) == 1]
    assert one and len(one) < len(mass)  # both kinds are checked
    for r in mass[:6] + one[:3]:
        q = qs[r["key"]]
        batch = vlm.build_inputs(proc, [q["question"]], [[common.load_image(toy_tiny / "data/toy/images", p)
                                                            for p in q["images"]]], answers=[q["gold"]])  # with EOS
        with torch.no_grad():
            _, token_logps, n = vlm.response_logps(model, batch)
        lp = token_logps[0][token_logps[0] != 0][: len(tok_ids[q["gold"]])].sum()  # the truth's tokens, not EOS
        assert r["truth"] == pytest.approx(float(lp.exp()), rel=1e-4, abs=1e-9)
    rej = [r for r in mass if "rejected" in r]
    answers = {r["key"]: r for r in map(json.loads, (tmp_path / "answers-m.jsonl").read_text().splitlines())}
    vocab = set(ev.answer_vocab(list(qs.values())))
    assert len(rej) == sum(not answers[r["key"]]["correct"] and common.normalise_answer(answers[r["key"]]["answer"]) in vocab
                           for r in mass)  # a rejected mass exactly where the wrong answer is an answer word
    assert all(0 <= r["rejected"] <= r["vocab"] for r in rej)
    assert "probability mass at the first answer token" in (tmp_path / "report.txt").read_text()
