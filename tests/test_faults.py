"""Hostile but realistic input, through the command line: every case gives one clear line naming
the file (and line or field where it has one), or a counted skip with its reason; no input
changes; nothing is written outside the stage's outputs. docs/faults.md is the table of cases.

Each test runs the stage as a user would (a subprocess in a folder of its own) and checks the
whole folder before and after with `Workspace`.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import common

ROOT = Path(__file__).resolve().parents[1]


class Workspace:
    """A folder for one case: `snapshot()` before the run, `changed()` after -> the paths written,
    created or removed since (relative to the folder)."""

    def __init__(self, path):
        self.path = Path(path)
        self.before = {}

    def _files(self):
        out = {}
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                p = Path(dirpath) / f
                out[p.relative_to(self.path).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def snapshot(self):
        self.before = self._files()

    def changed(self):
        after = self._files()
        return {p for p in set(self.before) | set(after) if self.before.get(p) != after.get(p)}

    def assert_only(self, *prefixes):
        """Every change is under one of `prefixes` (outputs); inputs are byte-identical."""
        stray = sorted(p for p in self.changed() if not p.startswith(prefixes))
        assert not stray, f"written outside the outputs {prefixes}: {stray}"


def stage(script, *argv, cwd):
    """Run a stage as a user would -> CompletedProcess (stdout and stderr as text)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(run):
    return (run.stderr.strip() or run.stdout.strip()).splitlines()[-1]


def llava_rows(ws, n=8, extra=()):
    """A small LLaVA-format set in ws/images + ws/in.jsonl (n good rows + `extra` rows)."""
    (ws / "images" / "a").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90)).save(ws / "images" / "a" / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"a/{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                       {"from": "gpt", "value": f"color {i}"}]})
    rows += list(extra)
    common.write_jsonl(ws / "in.jsonl", rows)
    return rows


def row(rid, image):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                         {"from": "gpt", "value": "x"}]}


def sidecar(path):
    return json.loads(Path(str(path) + ".meta.json").read_text())


# ---- images --------------------------------------------------------------------------------
def test_decompression_bomb_is_a_counted_skip_in_01_02_03(tmp_path):
    llava_rows(tmp_path, extra=[row("bomb", "a/bomb.png"), row("big", "a/big.png")])
    Image.new("1", (20000, 20000)).save(tmp_path / "images" / "a" / "bomb.png")  # PIL refuses it (> 179 MP)
    Image.new("1", (9000, 9000)).save(tmp_path / "images" / "a" / "big.png")  # 81 MP > --max-image-pixels
    ws = Workspace(tmp_path)
    ws.snapshot()
    for script, out in (("01_make_sequence.py", "seq.jsonl"), ("02_make_grid.py", "grid.jsonl"),
                        ("03_make_pip.py", "pip.jsonl")):
        run = stage(script, "--data", "in.jsonl", "--image-root", "images", "--out", out, "--recipe", "toy",
                    cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        skipped = {r["id"]: r["reason"] for r in sidecar(tmp_path / out)["skipped"]["rows"]}
        assert "image too large" in skipped["bomb"] and "a/bomb.png" in skipped["bomb"], skipped
        assert "9000x9000" in skipped["big"] and "--max-image-pixels" in skipped["big"], skipped
    ws.assert_only("seq.jsonl", "grid.jsonl", "pip.jsonl", "images/mia_grid/", "images/mia_pip/")
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq2.jsonl",
                "--recipe", "toy", "--max-image-pixels", "0", cwd=tmp_path)  # 0: no limit (PIL's lifted too)
    assert run.returncode == 0 and sidecar(tmp_path / "seq2.jsonl")["skipped"]["rows"] == []


def test_truncated_png_is_caught_by_the_default_check(tmp_path):
    llava_rows(tmp_path, extra=[row("cut", "a/cut.png")])
    Image.effect_noise((64, 64), 60).save(tmp_path / "images" / "a" / "full.png")
    data = (tmp_path / "images" / "a" / "full.png").read_bytes()
    (tmp_path / "images" / "a" / "cut.png").write_bytes(data[: len(data) // 2])
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    skipped = {r["id"]: r["reason"] for r in sidecar(tmp_path / "seq.jsonl")["skipped"]["rows"]}
    assert skipped["cut"].startswith("unreadable image: a/cut.png")


@pytest.mark.parametrize("script", ["02_make_grid.py", "03_make_pip.py"])
def test_a_companion_that_fails_to_decode_is_drawn_again(tmp_path, script):
    llava_rows(tmp_path, n=12, extra=[row("cut", "a/cut.jpg")])
    Image.effect_noise((256, 256), 60).convert("RGB").save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "images" / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])  # passes the check before use
    outs = []
    for workers in (1, 2):
        run = stage(script, "--data", "in.jsonl", "--image-root", "images", "--out", f"o{workers}.jsonl",
                    "--recipe", "toy", "--counts" if script == "02_make_grid.py" else "--scale",
                    "9" if script == "02_make_grid.py" else "0.7", "--workers", workers, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        meta = sidecar(tmp_path / f"o{workers}.jsonl")
        # its own row is the only one lost: every row that drew it as a companion drew another
        assert {r["id"]: r["reason"].split(":")[0] for r in meta["skipped"]["rows"]} == {"cut": "unreadable image"}
        rows = [json.loads(x) for x in (tmp_path / f"o{workers}.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and all("a/cut.jpg" not in r["mia"]["companions"] for r in rows)
        outs.append((tmp_path / f"o{workers}.jsonl").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("path", ["../../outside.png", "ABSOLUTE"])
def test_image_path_outside_the_root_is_refused_unless_allowed(tmp_path, path):
    (tmp_path / "w").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "outside.png")
    path = str(tmp_path / "outside.png") if path == "ABSOLUTE" else path
    llava_rows(tmp_path / "w", extra=[row("escape", path)])
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", cwd=tmp_path / "w")
    skipped = {r["id"]: r["reason"] for r in sidecar(tmp_path / "w" / "seq.jsonl")["skipped"]["rows"]}
    assert run.returncode == 0 and skipped["escape"].startswith("image outside --image-root"), skipped
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", "--allow-outside-root", cwd=tmp_path / "w")
    assert run.returncode == 0 and "escape" not in {r["id"] for r in sidecar(tmp_path / "w" / "seq.jsonl")["skipped"]["rows"]}


def test_image_out_outside_the_root_needs_the_flag(tmp_path):
    llava_rows(tmp_path)
    ws = Workspace(tmp_path)
    ws.snapshot()
    run = stage("02_make_grid.py", "--data", "in.jsonl", "--image-root", "images", "--out", "g.jsonl",
                "--image-out", "collages", "--recipe", "toy", cwd=tmp_path)
    assert run.returncode != 0 and "--image-out collages is outside --image-root images" in last_line(run)
    ws.assert_only()  # nothing at all written


# ---- text ----------------------------------------------------------------------------------
def test_non_utf8_byte_names_file_and_line_and_is_skippable_in_jsonl(tmp_path):
    rows = llava_rows(tmp_path)
    lines = [json.dumps(r).encode() for r in rows]
    lines[3] = lines[3].replace(b"color 3", b"colour caf\xe9")  # Latin-1, as an old export writes it
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ws = Workspace(tmp_path)
    ws.snapshot()
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", cwd=tmp_path)
    column = lines[3].index(b"\xe9") + 1
    assert run.returncode != 0 and last_line(run) == ("01_make_sequence.py: in.jsonl:4: not UTF-8: byte 0xe9 at "
                                                      f"column {column} (save the file as UTF-8)")
    ws.assert_only()
    run = stage("01_make_sequence.py", "--data", "in.jsonl", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", "--on-error", "skip", cwd=tmp_path)
    meta = sidecar(tmp_path / "seq.jsonl")
    assert run.returncode == 0 and meta["counts"]["rows_written"] == 7
    assert meta["skipped"]["rows"][0]["line"] == 4 and "not UTF-8" in meta["skipped"]["rows"][0]["reason"]
    ws.assert_only("seq.jsonl")


def test_non_utf8_byte_in_a_json_list_names_its_line(tmp_path):
    rows = llava_rows(tmp_path)
    text = json.dumps(rows, indent=1).encode().replace(b'"color 5"', b'"caf\xe9"')
    (tmp_path / "in.json").write_bytes(text)
    line = text[: text.index(b"\xe9")].count(b"\n") + 1
    run = stage("01_make_sequence.py", "--data", "in.json", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", "--on-error", "skip", cwd=tmp_path)  # a list cannot be read past it
    assert run.returncode != 0 and last_line(run).startswith(f"01_make_sequence.py: in.json:{line}: not UTF-8")


def test_05_on_an_empty_pair_file_says_so(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    run = stage("05_post_select.py", "--data", "pairs.jsonl", "--out", "post.jsonl", cwd=tmp_path)
    assert run.returncode != 0 and last_line(run).startswith("05_post_select.py: pairs.jsonl: no pairs to select from")
    assert not (tmp_path / "post.jsonl").exists()


# ---- 04: a model on hostile rows -------------------------------------------------------------
@pytest.fixture(scope="module")
def seq_world(toy_tiny, tmp_path_factory):
    """A copy of the tiny toy world's images and model, and a few sequence rows from 01."""
    ws = tmp_path_factory.mktemp("faults04")
    shutil.copytree(Path(toy_tiny) / "data" / "toy" / "images", ws / "images")
    shutil.copytree(Path(toy_tiny) / "models" / "toy-llava", ws / "model")
    shutil.copy(Path(toy_tiny) / "data" / "toy" / "train.json", ws / "train.json")
    run = stage("01_make_sequence.py", "--data", "train.json", "--image-root", "images", "--out", "seq.jsonl",
                "--recipe", "toy", "--limit", "6", cwd=ws)
    assert run.returncode == 0, run.stderr
    return ws


@pytest.mark.slow
def test_04_viz_file_names_cannot_escape_and_bombs_are_counted(seq_world, tmp_path):
    ws = tmp_path / "w"
    shutil.copytree(seq_world, ws)
    rows = [json.loads(x) for x in (ws / "seq.jsonl").read_text().splitlines()]
    rows[0]["id"], rows[1]["id"] = "../../../escaped-viz", str(tmp_path / "abs-viz")
    Image.new("1", (20000, 20000)).save(ws / "images" / "bomb.png")
    rows[2]["image"][0] = "bomb.png"
    common.write_jsonl(ws / "seq.jsonl", rows)
    before = Workspace(tmp_path)
    before.snapshot()
    run = stage("04_gen_pairs.py", "--data", "seq.jsonl", "--image-root", "images", "--model", "model",
                "--out", "out/pairs.jsonl", "--viz", "6", cwd=ws)
    assert run.returncode == 0, run.stderr
    before.assert_only("w/out/")
    assert len(list((ws / "out" / "pairs.viz").glob("*.png"))) == 5  # the bomb row has no picture
    cands = {c["id"]: c for c in map(json.loads, (ws / "out" / "pairs.candidates.jsonl").read_text().splitlines())}
    assert cands[rows[2]["id"]]["reason"].startswith("unreadable image") and "too large" in cands[rows[2]["id"]]["reason"]


@pytest.mark.slow
def test_a_second_04_on_the_same_out_stops_at_once(seq_world, tmp_path):
    out = seq_world / "locked" / "pairs.jsonl"
    with common.output_lock(out):  # a first run holding it
        run = stage("04_gen_pairs.py", "--data", "seq.jsonl", "--image-root", "images", "--model", "model",
                    "--out", out, cwd=seq_world)
    assert run.returncode != 0 and "another process is writing it" in last_line(run) and f"pid {os.getpid()}" in last_line(run)
    assert not out.exists() and not list(out.parent.glob("*.partial"))


# ---- 07: every input checked before the first model runs -------------------------------------------
@pytest.fixture()
def eval_world(seq_world, tmp_path):
    ws = tmp_path / "w"
    shutil.copytree(seq_world, ws)
    rows = [json.loads(x) for x in (ws / "seq.jsonl").read_text().splitlines()]
    return ws, rows


@pytest.mark.slow
def test_07_refuses_a_missing_model_before_evaluating_any(eval_world):
    ws, _ = eval_world
    run = stage("07_eval.py", "--model", "base=model", "--model", "dpo=out/missing", "--data", "seq.jsonl",
                "--image-root", "images", "--out", "eval", cwd=ws)
    assert run.returncode != 0 and last_line(run).startswith("07_eval: --model dpo=out/missing: no config.json")
    assert not (ws / "eval").exists()  # the base was not evaluated first


@pytest.mark.slow
def test_07_bad_image_stops_naming_it_or_is_a_counted_skip(eval_world):
    ws, rows = eval_world
    (ws / "images" / "broken.png").write_bytes(b"not a png")
    rows[1]["image"][0] = "broken.png"
    common.write_jsonl(ws / "seq.jsonl", rows)
    args = ("--model", "base=model", "--data", "seq.jsonl", "--image-root", "images", "--out", "eval", "--no-mass")
    run = stage("07_eval.py", *args, cwd=ws)
    assert run.returncode != 0 and "images/broken.png: cannot read image" in last_line(run) and "--on-error skip" in last_line(run)
    run = stage("07_eval.py", *args, "--on-error", "skip", cwd=ws)
    assert run.returncode == 0, run.stderr
    meta = sidecar(ws / "eval" / "report.json")
    assert meta["counts"] == {"questions": 5, "skipped": 1} and meta["skipped"]["rows"][0]["id"] == rows[1]["id"]


@pytest.mark.slow
def test_07_empty_gold_answer_is_a_located_error(eval_world):
    ws, rows = eval_world
    rows[2]["conversations"][1]["value"] = ""
    common.write_jsonl(ws / "seq.jsonl", rows)
    run = stage("07_eval.py", "--model", "base=model", "--data", "seq.jsonl", "--image-root", "images", "--out", "eval",
                cwd=ws)
    assert run.returncode != 0 and last_line(run) == "07_eval.py: seq.jsonl:3: conversations[1].value: empty gold answer"


# ---- 06: an output folder belongs to one run -------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_world(toy_tiny, tmp_path_factory):
    from conftest import make_pairs, write

    d = tmp_path_factory.mktemp("faults06")
    return {"model": toy_tiny / "models" / "toy-llava", "images": toy_tiny / "data" / "toy" / "images",
            "pairs": write(d / "pairs.jsonl", make_pairs(toy_tiny, 8))}


def dpo(world, out, *extra, limit_bytes=None):
    """06 through its command line (4 steps of 2 pairs, checkpoints every 2) -> CompletedProcess."""
    from conftest import dpo_argv

    argv = dpo_argv(world, out, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "1", *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def limit():  # a full disk, as the process sees it: writes past limit_bytes fail (EFBIG)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, str(ROOT / "06_train_dpo.py"), *argv], capture_output=True, text=True,
                          timeout=600, env=env, preexec_fn=limit if limit_bytes else None)


def tree(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(path).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_06_never_overwrites_a_finished_run_nor_resumes_one_of_other_settings(dpo_world, tmp_path):
    out = tmp_path / "out"
    assert dpo(dpo_world, out, "--lr", "2e-4").returncode == 0
    finished = tree(out)
    run = dpo(dpo_world, out, "--lr", "1e-3")  # a new run into the finished one's folder
    assert run.returncode != 0 and "holds an earlier run" in last_line(run) and "--overwrite" in last_line(run)
    run = dpo(dpo_world, out, "--lr", "1e-3", "--resume", "auto")  # ... or resuming it with other settings
    assert run.returncode != 0 and "written with other settings (lr 0.0002 -> 0.001)" in last_line(run), last_line(run)
    assert tree(out) == finished  # log, checkpoints, final: all as the first run left them
    run = dpo(dpo_world, out, "--lr", "2e-4", "--resume", "auto")  # the same settings: its own checkpoint
    assert run.returncode == 0 and "resumed at step 4" in run.stdout
    run = dpo(dpo_world, out, "--lr", "1e-3", "--overwrite")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert run.returncode == 0 and [r["lr"] > 2e-4 for r in log[1:]] == [True] * 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]


@pytest.mark.slow
def test_06_resumes_past_a_torn_log_line(dpo_world, tmp_path):
    out = tmp_path / "out"
    assert dpo(dpo_world, out, "--keep-checkpoints", "0").returncode == 0
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed while writing step 3's log line:
    shutil.rmtree(out / "adapter")  # (dpo_argv: LoRA, not merged)
    lines = (out / "log.jsonl").read_text().splitlines(True)
    (out / "log.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # steps 1-2, and half of 3
    run = dpo(dpo_world, out, "--keep-checkpoints", "0", "--resume", "auto")
    assert run.returncode == 0, run.stderr
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_06_full_disk_is_one_line_and_leaves_no_partial_checkpoint(dpo_world, tmp_path):
    out = tmp_path / "out"
    run = dpo(dpo_world, out, limit_bytes=100_000)  # a checkpoint here is ~330 kB
    assert run.returncode != 0 and last_line(run).startswith("06_train_dpo: cannot write checkpoint")
    assert "Traceback" not in run.stderr
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_second_06_on_the_same_out_stops_at_once(dpo_world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    common.hold_output(out)  # a first run holding it
    try:
        run = dpo(dpo_world, out)
    finally:
        common.release_output(out)
    assert run.returncode != 0 and "another process is writing it" in last_line(run)
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
def test_06_paper_recipe_on_a_small_cpu_run_names_every_flag_at_once(dpo_world, tmp_path):
    """04 stored fp32 reference log-probs for 3 pairs; the paper recipe (bf16, 1 pair x 8 accumulation)
    meets two problems at once, and says both with the flags that fix them."""
    import vlm
    from conftest import write

    model, _ = vlm.load_model(dpo_world["model"], dtype="float32")
    ref = {"path": str(dpo_world["model"]), "fingerprint": vlm.model_fingerprint(model), "dtype": "float32"}
    rows = [{**json.loads(x), "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, "ref_model": ref}
            for x in dpo_world["pairs"].read_text().splitlines()[:3]]
    pairs = write(tmp_path / "pairs.jsonl", rows)
    run = stage("06_train_dpo.py", "--pairs", pairs, "--image-root", dpo_world["images"], "--model", dpo_world["model"],
                "--out", tmp_path / "out", "--recipe", "paper", cwd=tmp_path)
    msg = run.stderr.strip().split("06_train_dpo: cannot start:", 1)[-1]
    assert run.returncode != 0 and "cannot start:" in run.stderr
    assert "3 usable pairs, fewer than one global batch (8" in msg and "--grad-accum" in msg
    assert "04 loaded the weights as float32, this run as bfloat16: --dtype float32" in msg and "--ref-logps recompute" in msg
    run = stage("06_train_dpo.py", "--pairs", pairs, "--image-root", dpo_world["images"], "--model", dpo_world["model"],
                "--out", tmp_path / "out", "--recipe", "paper", "--grad-accum", "1", "--dtype", "float32",
                "--max-steps", "1", "--no-merge", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
