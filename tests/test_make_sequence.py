"""01_make_sequence.py: prompt rewrite, companions, skips, determinism, command line.

The tiny LLaVA-format set (`ds`, `make_llava_set`, `run`, `BAD`) is shared with the 02 and 03
tests and lives in conftest.py.
"""
import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BAD, QUESTIONS, make_llava_set, run  # the tiny LLaVA set (fixture `ds`)

import common
import compose

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
seq = importlib.import_module("01_make_sequence")

# ---- pure functions ----
@pytest.mark.parametrize("text, expected", [
    ("What is this?", "what is this?"), ("A dog runs.", "a dog runs."), ("Is it red?", "is it red?"),
    ("It's red?", "it's red?"), ("I think so?", "I think so?"), ("I'm sure?", "I'm sure?"), ("I've seen it", "I've seen it"),
    ("OCR the title.", "OCR the title."), ("USA or UK?", "USA or UK?"), ("iPhone model?", "iPhone model?"),
    ("McDonald's logo?", "McDonald's logo?"), ("A4 paper?", "A4 paper?"), ("3 dogs?", "3 dogs?"),
    ('"Stop" sign?', '"Stop" sign?'), ("Über?", "über?"), ("what now?", "what now?"), ("", ""),
])
def test_lower_first(text, expected):
    assert compose.lower_first(text) == expected


@pytest.mark.parametrize("turn", QUESTIONS + ["What color is the shape? <image>", "  <image> \nWhat color is the shape?  ",
                                              "Image12: <image>\nin image12, What color is the shape?"])
def test_clean_question_strips_marker_and_labels(turn):
    q = compose.clean_question(turn)
    assert q.lower() == "what color is the shape?" and "<image>" not in q


def test_clean_question_keeps_text_on_both_sides():
    assert compose.clean_question("Look here.\n<image>\nWhat is it?") == "Look here.\nWhat is it?"


def _source(questions, answers, image="a/x.png"):
    conv = [t for q, a in zip(questions, answers) for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    qs, ans = compose.source_turns(conv)
    return compose.Source("s1", image, compose.subset_of(image), 1, {"id": "s1", "image": image, "conversations": conv, "toy": 1}, qs, ans)


def test_sequence_prompt_multi_turn():
    src = _source(["Image3:<image>\nIn Image3, What is it?", "Is it big?", "OCR it."], ["a cat", "yes", "TEXT"])
    pools = {"a": [f"a/{i}.png" for i in range(6)] + ["a/x.png"]}
    pools[None] = pools["a"]
    row, fell_back = seq.make_sequence(src, pools, {4: 1.0}, random.Random(0))
    k = row["mia"]["target"]
    assert row["image"][k - 1] == "a/x.png" and len(row["image"]) == 4 and not fell_back
    conv = row["conversations"]
    assert conv[0]["value"] == f"Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nIn Image{k}, what is it?"
    assert conv[2]["value"] == f"In Image{k}, is it big?" and conv[4]["value"] == f"In Image{k}, OCR it."
    assert [t["value"] for t in conv[1::2]] == ["a cat", "yes", "TEXT"]
    assert row["id"] == "seq-s1" and row["toy"] == 1 and list(row)[:3] == ["id", "image", "conversations"]
    first_only, _ = seq.make_sequence(src, pools, {4: 1.0}, random.Random(0), first_turn_only=True)
    assert len(first_only["conversations"]) == 2


@pytest.mark.parametrize("conv, reason", [
    ([("What?", "x")], "no <image> in first human turn"),
    ([("<image>\n<image>\nWhat?", "x")], "several <image> in first human turn"),
    ([("<image>\nWhat?", "x"), ("<image>\nAnd?", "y")], "<image> in a later human turn"),
    ([("<image>\nWhat?", "")], "empty answer"),
    ([("<image>", "x")], "empty question"),
    ([("<image>\nWhat?", "x" * 512)], "long answer"),
])
def test_parse_conversation_rejects(conv, reason):
    turns = [t for q, a in conv for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    with pytest.raises(compose.SkipRow, match=reason):
        compose.source_turns(turns)


def test_draw_companions_uniform_never_own_and_fallback():
    local, everyone = ["a/1", "a/2", "a/3"], ["a/1", "a/2", "a/3", "b/1", "b/2"]
    seen = set()
    for s in range(300):
        got, fb = compose.draw_companions(random.Random(s), {"a/2"}, local, everyone, 2)
        assert not fb and "a/2" not in got and len(set(got)) == 2 and set(got) <= {"a/1", "a/3"}
        got, fb = compose.draw_companions(random.Random(s), {"a/2"}, local, everyone, 3)
        assert fb and "a/2" not in got and len(set(got)) == 3
        seen.update(got)
    assert seen == {"a/1", "a/3", "b/1", "b/2"}
    with pytest.raises(compose.SkipRow, match="too few images"):
        compose.draw_companions(random.Random(0), {"a/1"}, local, everyone, 5)


def test_count_mix_follows_weights():
    weights = compose.parse_counts(seq.COUNTS, {2, 3, 4, 5})
    draws = [random.Random(i).choices(list(weights), list(weights.values()))[0] for i in range(4000)]
    assert abs(draws.count(2) / 4000 - 0.55) < 0.03 and abs(draws.count(5) / 4000 - 0.13) < 0.03
    assert compose.parse_counts("3", {2, 3}) == {3: 1.0}
    with pytest.raises(ValueError):
        compose.parse_counts("6:1", {2, 3, 4, 5})


# ---- the stage on the test set ----
def test_companions_from_own_subset_and_counted_fallback(ds, tmp_path):
    rows, meta = run(seq, ds, tmp_path / "s.jsonl", "--counts", "3")
    assert len(rows) == 24 - 0 and all(r["mia"]["n_images"] == 3 for r in rows)
    for r in rows:
        own = r["mia"]["source_images"][0]
        assert own not in r["mia"]["companions"] and r["image"][r["mia"]["target"] - 1] == own
        assert r["conversations"][0]["value"].startswith("Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image")
        if r["mia"]["companions_fallback"]:
            assert own.split("/")[0] in ("c", "vg")  # 2-image sub-datasets cannot give 2 companions
        else:
            assert {p.split("/")[0] for p in r["image"]} == {own.split("/")[0]}
        assert all(p in ds["colors"] for p in r["image"])  # never a missing/corrupt image
    assert meta["counts"]["companions_fallback"] == 4
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    src = {r["id"]: r for r in ds["rows"]}
    assert all(r["toy"] == src[r["mia"]["sources"][0]]["toy"] for r in rows)


def test_each_bad_input_is_a_counted_skip(ds, tmp_path):
    rows, meta = run(seq, ds, tmp_path / "s.jsonl")
    by_reason = meta["skipped"]["by_reason"]
    assert by_reason == {reason: 1 for reason in BAD}
    assert {r["id"] for r in meta["skipped"]["rows"]} == set(BAD.values())
    assert meta["counts"]["rows_read"] == 29 and len(rows) == 24
    assert {r["mia"]["sources"][0] for r in rows}.isdisjoint(BAD.values())


def test_malformed_line_names_file_and_line_unless_skip(ds, tmp_path):
    args = ["--data", str(ds["bad"]), "--image-root", str(ds["root"]), "--out", str(tmp_path / "s.jsonl")]
    with pytest.raises(common.DataError, match=r"bad\.jsonl:3: invalid JSON"):
        seq.main(seq.get_args(args))
    assert not (tmp_path / "s.jsonl").exists()
    seq.main(seq.get_args(args + ["--on-error", "skip"]))
    meta = json.loads((tmp_path / "s.jsonl.meta.json").read_text())
    assert meta["skipped"]["by_reason"]["malformed row"] == 1 and meta["counts"]["rows_written"] == 24
    p = subprocess.run([sys.executable, "01_make_sequence.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "bad.jsonl:3: invalid JSON" in p.stderr and "Traceback" not in p.stderr


def test_deterministic_across_workers_and_input_order(ds, tmp_path):
    rows = [json.loads(line) for line in ds["jsonl"].read_text().splitlines()]
    random.Random(1).shuffle(rows)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for data, workers in ((ds["data"], 1), (ds["jsonl"], 2), (shuffled, 2)):
        out = tmp_path / f"s{len(outs)}.jsonl"
        seq.main(seq.get_args(["--data", str(data), "--image-root", str(ds["root"]), "--out", str(out), "--workers", str(workers)]))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    # --limit: a seeded subset of 7 text-valid rows (the same for any order); image checks come after
    (a, meta), (b, _) = [run(seq, ds, tmp_path / f"l{i}.jsonl", "--limit", "7", "--seed", "3") for i in range(2)]
    bad_images = sum(meta["skipped"]["by_reason"].get(k, 0) for k in ("missing image", "unreadable image"))
    assert len(a) + bad_images == 7 and a == b


def test_verify_full_catches_a_truncated_image(tmp_path):
    d = make_llava_set(tmp_path)
    png = (d["root"] / "a" / "a-05.png").read_bytes()
    (d["root"] / "a" / "a-05.png").write_bytes(png[: len(png) // 2])  # header intact, data cut
    rows, meta = run(seq, d, tmp_path / "s.jsonl", "--verify", "full")
    assert meta["skipped"]["by_reason"]["unreadable image"] == 2
    assert all("a/a-05.png" not in r["image"] for r in rows)


def test_command_line_smoke(ds, tmp_path):
    out = tmp_path / "seq.jsonl"
    p = subprocess.run([sys.executable, "01_make_sequence.py", "--data", str(ds["jsonl"]), "--image-root", str(ds["root"]),
                        "--out", str(out), "--seed", "5"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "24 written" in p.stdout and "skipped 5" in p.stdout and "1 missing image" in p.stdout
    assert len(out.read_text().splitlines()) == 24
    h = subprocess.run([sys.executable, "01_make_sequence.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--on-error" in h.stdout and "--counts" in h.stdout


def test_missing_toy_data_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compose, "TOY", tmp_path / "no-toy")
    with pytest.raises(SystemExit, match="00_make_toy.py"):
        seq.main(seq.get_args([]))


def test_recipe_toy_for_the_toy_world_paper_otherwise(ds, tmp_path):
    """Data 00_make_toy.py wrote gets the toy recipe (equal image counts, a 4000-row subset); any
    other data the paper's (all rows, the authors' mix); a flag given wins."""
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "train.json").write_bytes(ds["data"].read_bytes())
    (toy / "train.json.meta.json").write_text(json.dumps({"script": "00_make_toy.py"}))
    _, meta = run(seq, {**ds, "data": toy / "train.json"}, tmp_path / "t.jsonl")
    assert (meta["args"]["recipe"], meta["args"]["counts"], meta["args"]["limit"]) == ("toy", "2:1,3:1,4:1,5:1", 4000)
    _, meta = run(seq, ds, tmp_path / "p.jsonl")
    assert (meta["args"]["recipe"], meta["args"]["counts"], meta["args"]["limit"]) == ("paper", seq.COUNTS, 0)
    _, meta = run(seq, {**ds, "data": toy / "train.json"}, tmp_path / "f.jsonl", "--counts", "2", "--recipe", "paper")
    assert (meta["args"]["recipe"], meta["args"]["counts"], meta["args"]["limit"]) == ("paper", "2", 0)
