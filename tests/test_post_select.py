"""05_post_select.py: each filter on hand cases, the drop table, the command line and the TRL export."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import DataError

ps = importlib.import_module("05_post_select")
ROOT = Path(__file__).resolve().parents[1]


def pair(i, chosen="blue", rejected="red", ppl=2.0, fmt="sequence", image=None,
         prompt="Image1:<image>\nIn Image1, what color?"):
    return {"id": f"p{i}", "image": image or [f"a/{i}.png"], "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "mia": {"format": fmt}, "probe": {"ppl": ppl, "ratio": 0.3}, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0,
            "ref_model": {"path": "models/x", "fingerprint": "0123abcd"}}


def test_pure_measures_hand_cases():
    assert ps.length_ratio("red", "it is red") == 3.0 and ps.length_ratio("", "no") == 1.0
    assert ps.length_ratio("a b c d e f", "x y") == 3.0
    assert ps.edit_distance("The red.", "red") == 0.0 and ps.edit_distance("red", "blue") == 1.0
    assert abs(ps.edit_distance("a red car", "a blue car") - 0.5) < 1e-9  # 'red car' vs 'blue car': 4 edits / 8


def test_balance_counts_hand_cases():
    counts = {"sequence": 100, "grid": 50, "pip": 10}
    assert ps.balance_counts(counts, ps.MIXES["equal"]) == {"sequence": 10, "grid": 10, "pip": 10}
    assert ps.balance_counts(counts, ps.MIXES["paper"]) == {"sequence": 33, "grid": 20, "pip": 10}
    assert ps.balance_counts({"sequence": 5, "grid": 0}, ps.MIXES["equal"]) == {"sequence": 5}
    with pytest.raises(ValueError):
        ps.balance_counts({"collage": 3}, ps.MIXES["equal"])


@pytest.mark.parametrize("p,filt", [
    (pair(1, ppl=1.1), "perplexity"),  # the floor is exclusive (04's PPL > 1.1)
    (pair(1, ppl=10.5), "perplexity"),
    (pair(1, ppl=None), "perplexity"),  # 04 writes None for an infinite PPL
    (pair(1, rejected="it is red too"), "length ratio"),  # 4 words vs 1
    (pair(1, chosen="The bus is blue.", rejected="the bus is Blue"), "edit distance"),  # equal up to case/punctuation
    (pair(1, chosen="there are twenty one people standing here", rejected="there are twenty one people standing hera"),
     "edit distance"),  # one character in 41
])
def test_each_filter_drops_its_case(p, filt):
    kept, dropped = ps.post_select([p])
    assert kept == [] and [d[0] for d in dropped] == [filt]


@pytest.mark.parametrize("p", [
    pair(1, ppl=10.0), pair(1, ppl=1.11), pair(1, rejected="it is red"),
    pair(1, chosen="The man is holding a red umbrella", rejected="The man is holding a blue umbrella"),
])
def test_boundary_cases_are_kept(p):
    assert ps.post_select([p])[0] == [p]


def test_duplicates_keep_the_first_and_flags_override():
    a, b, c = pair(1), pair(2, image=["a/1.png"]), pair(3, image=["a/1.png"], rejected="green")
    kept, dropped = ps.post_select([a, b, c])
    assert kept == [a, c] and [(d[0], d[2]["id"]) for d in dropped] == [("duplicates", "p2")]
    long = pair(4, rejected="it is red too")  # 4 words vs 1
    assert ps.post_select([long], max_length_ratio=4.0)[0] == [long]
    assert ps.post_select([pair(5, ppl=30.0)], max_ppl=50.0)[0] != []
    near = pair(6, chosen="blue car", rejected="blue cat")  # 1/8
    assert ps.post_select([near])[0] and not ps.post_select([near], min_edit_distance=0.2)[0]


def test_balance_is_seeded_per_id_not_by_order():
    pairs = [pair(i, fmt=f, rejected=f"r{i}") for i, f in enumerate(["sequence"] * 9 + ["grid"] * 4 + ["pip"] * 2)]
    kept, dropped = ps.post_select(pairs, balance="equal", seed=3)
    assert sorted(sum(p["mia"]["format"] == f for p in kept) for f in ("sequence", "grid", "pip")) == [2, 2, 2]
    assert {d[0] for d in dropped} == {"balance"} and len(dropped) == 9
    again, _ = ps.post_select(pairs[::-1], balance="equal", seed=3)
    assert sorted(p["id"] for p in again) == sorted(p["id"] for p in kept)
    other, _ = ps.post_select(pairs, balance="equal", seed=4)
    assert len(other) == 6


def test_drop_table_counts_per_format():
    pairs = [pair(1), pair(2, ppl=99, fmt="grid"), pair(3, fmt="pip", rejected="Blue!")]
    kept, dropped = ps.post_select(pairs)
    text, table = ps.drop_table(pairs, kept, dropped)
    assert table["perplexity"] == {"grid": 1, "pip": 0, "sequence": 0}
    assert table["edit distance"]["pip"] == 1 and table["kept"] == {"grid": 0, "pip": 0, "sequence": 1}
    assert text.splitlines()[0].split() == ["filter", "grid", "pip", "sequence", "total"]


def test_load_pairs_names_missing_fields(tmp_path):
    bad = pair(1)
    del bad["probe"]["ppl"]
    (tmp_path / "p.jsonl").write_text(json.dumps(pair(0)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: probe.ppl"):
        ps.load_pairs([tmp_path / "p.jsonl"])


def test_cli_writes_kept_pairs_and_sidecar(tmp_path):
    shards = [[pair(1), pair(2, ppl=99, fmt="grid")], [pair(1), pair(3, fmt="pip")]]
    for k, rows in enumerate(shards):
        (tmp_path / f"pairs-{k:02d}-of-02.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "post.jsonl"
    shard_files = sorted(map(str, tmp_path.glob("pairs-*")))
    cmd = [sys.executable, str(ROOT / "05_post_select.py"), "--data", *shard_files, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in kept] == ["p1", "p3"] and kept[0] == pair(1)  # fields pass through unchanged
    meta = json.loads((tmp_path / "post.jsonl.meta.json").read_text())
    assert meta["counts"]["table"]["duplicates"]["sequence"] == 1 and meta["counts"]["table"]["perplexity"]["grid"] == 1
    assert meta["skipped"]["by_reason"] == {"duplicates": 1, "perplexity": 1}
    assert "duplicates" in run.stdout and "2 kept" in run.stdout


def test_trl_export_keeps_images_interleaved(tmp_path, toy_tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(Path(toy_tiny) / "models" / "toy-llava", local_files_only=True)
    two = "Image1:<image>\nImage2:<image>\nIn Image2, what color?"
    pairs = [pair(1), pair(3, prompt=two, image=["a/1.png", "mia_pip/x.jpg"])]
    rows = ps.to_trl(pairs, processor, tmp_path / "img")
    assert set(rows[0]) == {"id", "prompt", "chosen", "rejected", "images"}
    # the toy's llava-1.5 template, the BOS its tokenizer adds written out (TRL tokenises without special tokens)
    assert rows[0]["prompt"] == "<s>USER: Image1:<image>\nIn Image1, what color? ASSISTANT:"
    assert rows[1]["prompt"].startswith("<s>USER: Image1:<image>\nImage2:<image>\nIn Image2")  # labels stay before their images
    assert rows[0]["chosen"] == " blue</s>" and rows[0]["rejected"] == " red</s>"  # + EOS: the template writes none
    assert rows[1]["images"] == [str((tmp_path / "img" / p).resolve()) for p in ("a/1.png", "mia_pip/x.jpg")]


def test_sample_keeps_a_seeded_subset_per_format():
    pairs = [pair(i, fmt="sequence" if i < 6 else "grid") for i in range(10)]
    kept, dropped = ps.post_select(pairs, sample={"sequence": 2, "grid": 3})
    assert sorted(p["mia"]["format"] for p in kept) == ["grid"] * 3 + ["sequence"] * 2
    assert {d[0] for d in dropped} == {"sample"} and len(dropped) == 5
    again, _ = ps.post_select(list(reversed(pairs)), sample={"sequence": 2, "grid": 3})
    assert {p["id"] for p in again} == {p["id"] for p in kept}  # input order does not matter
    other, _ = ps.post_select(pairs, sample={"sequence": 2, "grid": 3}, seed=1)
    assert {p["id"] for p in other} != {p["id"] for p in kept}
    assert ps.post_select(pairs, sample={"sequence": 50})[0] == pairs[:6]  # fewer than asked: all, no grid


def test_sample_like_through_the_command_line(tmp_path):
    src, like = tmp_path / "all.jsonl", tmp_path / "like.jsonl"
    src.write_text("".join(json.dumps(pair(i, fmt="sequence" if i < 6 else "pip")) + "\n" for i in range(10)))
    like.write_text("".join(json.dumps(pair(100 + i, fmt=f)) + "\n" for i, f in enumerate(["sequence", "pip", "pip"])))
    run = subprocess.run([sys.executable, str(ROOT / "05_post_select.py"), "--data", str(src), "--out", str(tmp_path / "o.jsonl"),
                          "--sample-like", str(like)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    kept = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(p["mia"]["format"] for p in kept) == ["pip", "pip", "sequence"]
    assert "sample" in run.stdout


def test_formats_keeps_only_those_and_counts_the_rest():
    pairs = [pair(1), pair(2, fmt="grid"), pair(3, fmt="pip"), pair(4, ppl=50.0)]
    kept, dropped = ps.post_select(pairs, formats=["sequence"])
    assert [p["id"] for p in kept] == ["p1"]
    assert sorted((d[0], d[2]["id"]) for d in dropped) == [("format", "p2"), ("format", "p3"), ("perplexity", "p4")]
    text, table = ps.drop_table(pairs, kept, dropped)
    assert table["format"] == {"grid": 1, "pip": 1, "sequence": 0} and text.splitlines()[2].startswith("format")


def test_recipe_keeps_sequences_for_toy_pairs_and_every_format_otherwise(tmp_path, toy_tiny, capsys):
    toy_model = str(Path(toy_tiny) / "models" / "toy-llava")
    rows = [pair(1), pair(2, fmt="grid"), pair(3, fmt="pip")]
    for name, path in (("toy", toy_model), ("real", "models/llava-1.5-7b-hf")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({**r, "ref_model": {"path": path, "fingerprint": "f"}}) + "\n" for r in rows))
        kept, _ = ps.main(ps.get_args(["--data", str(src), "--out", str(tmp_path / f"{name}.post.jsonl")]))
        meta = json.loads((tmp_path / f"{name}.post.jsonl.meta.json").read_text())
        assert meta["args"]["recipe"] == ("toy" if name == "toy" else "paper")
        assert [p["mia"]["format"] for p in kept] == (["sequence"] if name == "toy" else ["sequence", "grid", "pip"])
    assert "05_post_select: recipe toy (auto: pairs from " in capsys.readouterr().out
    kept, _ = ps.main(ps.get_args(["--data", str(tmp_path / "toy.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                                   "--formats", "grid"]))  # a flag wins over the recipe
    assert [p["mia"]["format"] for p in kept] == ["grid"]
