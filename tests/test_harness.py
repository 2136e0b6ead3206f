"""07_harness.py (the driver), harness_models.py (our class inside a harness, its launcher) and
convert_nlvr2.py: prompts, configs, status/result reading and errors (fast, no harness needed), then
real runs of VLMEvalKit and lmms-eval on the toy model (skipped, with the reason, where not installed).

VLMEvalKit is not on PyPI: its tests run where `vlmeval` imports or VLMEVALKIT_DIR names a clone.
lmms-eval: `pip install -r requirements-harness.txt && pip install --no-deps lmms-eval==0.7.3`."""
import base64
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common
import convert_nlvr2
import harness_models as hm
import vlm

h = importlib.import_module("07_harness")
ev = importlib.import_module("07_eval")
ROOT = Path(__file__).resolve().parents[1]

VLMEVALKIT_DIR = os.environ.get("VLMEVALKIT_DIR")
HAS_VLMEVALKIT = bool(VLMEVALKIT_DIR) or importlib.util.find_spec("vlmeval") is not None
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_vlmevalkit = pytest.mark.skipif(not HAS_VLMEVALKIT, reason="VLMEvalKit is not installed (not on PyPI: git clone "
                                      "open-compass/VLMEvalKit, pip install -e it or set VLMEVALKIT_DIR)")
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (pip install -r requirements-harness.txt "
                                "&& pip install --no-deps lmms-eval==0.7.3)")


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _script(name, args, cwd, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _harness(args, cwd, timeout=600):
    return _script("07_harness.py", args, cwd, timeout)


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


# ---- prompts -------------------------------------------------------------------------------------------
def test_place_images_hand_cases():
    assert hm.place_images("In Image2, what?", 2) == "<image>\n<image>\nIn Image2, what?"
    placed = "Image1:<image>\nImage2:<image>\nIn Image2, what?"
    assert hm.place_images(placed, 2) == placed
    assert hm.place_images("Is <image 1> above <image 2>?", 2) == "Is <image> above <image>?"
    assert hm.place_images("Is <image 2> above <image 1>?", 2) == "<image>\n<image>\nIs <image 2> above <image 1>?"
    assert hm.place_images("no image", 0) == "no image"
    with pytest.raises(ValueError, match="1 <image> markers for 2 images"):
        hm.place_images("A <image> only", 2)


def test_messages_and_questions_round_trip_with_images_in_place():
    q = "Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape?"
    msg = hm.question_to_message(q, ["a.png", "b.png"])
    assert [m["type"] for m in msg] == ["text", "image", "text", "image", "text"]
    assert hm.message_to_question(msg) == (q, ["a.png", "b.png"])
    # a dataset's own message (images first, then the text): one line per image, as place_images does
    dataset_msg = [{"type": "image", "value": "a"}, {"type": "image", "value": "b"}, {"type": "text", "value": "Question: x"}]
    assert hm.message_to_question(dataset_msg) == ("<image>\n<image>\nQuestion: x", ["a", "b"])
    with pytest.raises(ValueError, match="images and text only"):
        hm.message_to_question([{"type": "video", "value": "v.mp4"}])


def test_mcq_wording_is_07s_and_reaches_the_chat_template_in_place(toy_tiny):
    q = hm.llava_mcq_question("Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape?", ["red", "blue"], 2)
    assert q == common.mc_prompt("Image1:<image>\nImage2:<image>\nIn Image2, what color is the shape?", 2, ["red", "blue"])
    assert q.endswith("\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.")
    assert hm.llava_mcq_question("Which?", ["x", "y"], 1, hint="Look.").startswith("<image>\nLook.\nWhich?\nA. x")
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(toy_tiny / "models" / "toy-llava", local_files_only=True)
    text = vlm.render_prompt(proc, q)
    assert text.startswith("USER: Image1:<image>\nImage2:<image>\nIn Image2, what color") and text.endswith("ASSISTANT:")


def test_truncate_at_stop_strings():
    assert hm.truncate_at("B ASSISTANT: more", ["ASSISTANT:"]) == "B "
    assert hm.truncate_at("B\n\nC", ["\n\n", "zz"]) == "B"
    assert hm.truncate_at("B", []) == "B"


def test_device_and_dtype_policy():
    assert vlm.pick_device("cpu") == "cpu" and vlm.pick_device("cuda:1") == "cuda:1"
    assert hm.pick_dtype("auto", "cuda") == "bfloat16" and hm.pick_dtype("auto", "cuda:0") == "bfloat16"
    assert hm.pick_dtype("auto", "cpu") == "auto" and hm.pick_dtype("float32", "cuda") == "float32"


# ---- VLMEvalKit: entries, config, command, status -------------------------------------------------------------
def test_vlmevalkit_entries_and_routes():
    assert h.vlmevalkit_entry("MMMU_DEV_VAL")[0] == h.vlmevalkit_entry("MMMU")[0] == "MMMU"  # our key or its dataset
    key, entry = h.vlmevalkit_entry("MVBench")
    entry["nframe"] = 1  # a copy: a config built from it leaves the table as it was
    assert h.vlmevalkit_entry("MVBench")[1]["nframe"] == 8 and key == "MVBench"
    assert h.vlmevalkit_entry("custom:MINE") == ("MINE", {"class": "CustomMCQDataset", "dataset": "MINE"})
    with pytest.raises(SystemExit, match="--lmms-eval"):
        h.vlmevalkit_entry("Mantis")
    with pytest.raises(SystemExit, match="convert_nlvr2.py"):
        h.vlmevalkit_entry("NLVR2")
    with pytest.raises(SystemExit, match="custom:NAME"):
        h.vlmevalkit_entry("NOPE")


def test_vlmevalkit_config_and_command_use_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entries = dict(h.vlmevalkit_entry(b) for b in ["BLINK", "custom:T"])
    cfg = h.vlmevalkit_config({"base": Path("m")}, entries, {"base": {"device": "cpu"}})
    assert cfg["model"]["base"] == {"class": hm.MODEL_CLASS, "model_path": str(tmp_path / "m"), "device": "cpu"}
    assert cfg["data"] == {"BLINK": {"class": "ImageMCQDataset", "dataset": "BLINK"},
                           "T": {"class": "CustomMCQDataset", "dataset": "T"}}
    one = h.vlmevalkit_command("/k/run.py", "/o/c.json", "/o/work", 1, "exact_matching")
    assert one[:3] == [sys.executable, str(ROOT / "harness_models.py"), "vlmevalkit"]
    assert one[3:] == ["/k/run.py", "--config", "/o/c.json", "--work-dir", "/o/work", "--mode", "all",
                       "--judge", "exact_matching"]
    assert h.vlmevalkit_command("/k/run.py", "c", "w", 8, "exact_matching")[:4] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=8"]


def test_missing_files_names_each_file(tmp_path):
    (tmp_path / "BLINK.tsv").write_text("")
    entries = dict(h.vlmevalkit_entry(b) for b in ["BLINK", "MMMU", "MVBench"])
    missing = h.missing_files(entries, tmp_path, tmp_path / "hub")
    hub = tmp_path / "hub" / "datasets--OpenGVLab--MVBench"
    assert missing == [str(tmp_path / "MMMU_DEV_VAL.tsv"), f"the HF cache of OpenGVLab/MVBench ({hub})"]


def test_vlmevalkit_score_from_status_entries():
    done = {"status": "done", "metrics": {"split=none|Overall": 0.5, "split=none|cat": 1.0}}
    assert h.vlmevalkit_score("BLINK", done) == (50.0, "split=none|Overall")
    mmmu = {"status": "done", "metrics": {"split=dev|Overall": 0.3, "split=validation|Overall": 0.351}}
    assert h.vlmevalkit_score("MMMU", mmmu) == (pytest.approx(35.1), "split=validation|Overall")
    with pytest.raises(ValueError, match="boom"):
        h.vlmevalkit_score("BLINK", {"status": "done", "error_message": "boom"})
    with pytest.raises(ValueError, match="failed with an empty message"):
        h.vlmevalkit_score("BLINK", {"status": "done", "error_message": ""})
    with pytest.raises(ValueError, match="skipped: invalid_dataset"):
        h.vlmevalkit_score("BLINK", {"status": "done", "skip_reason": "invalid_dataset"})
    with pytest.raises(ValueError, match="status 'infer'"):
        h.vlmevalkit_score("BLINK", {"status": "infer"})
    with pytest.raises(ValueError, match="no single Overall"):
        h.vlmevalkit_score("X", {"status": "done", "metrics": {"split=a|Overall": 0.1, "split=b|Overall": 0.2}})


def test_check_vlmevalkit_reads_only_the_new_run(tmp_path):
    """A score left by an earlier run never stands in for this run's missing one."""
    old = tmp_path / "base" / "T20260101-000000"
    old.mkdir(parents=True)
    ok = {"datasets": {"BLINK": {"status": "done", "metrics": {"split=none|Overall": 0.9}}}}
    (old / "status.json").write_text(json.dumps(ok))
    before = h.run_dirs(tmp_path, "base")
    entries = dict([h.vlmevalkit_entry("BLINK"), h.vlmevalkit_entry("custom:T")])
    scores, _, errors, run = h.check_vlmevalkit(tmp_path, "base", entries, before, code=0)
    assert (scores, run) == ({}, None) and "wrote no status.json" in errors[0] and "exit code 0" in errors[0]
    new = tmp_path / "base" / "T20260101-000001"
    new.mkdir()
    (new / "status.json").write_text(json.dumps({"datasets": {"BLINK": {"status": "done", "error_message": "md5 differs"}}}))
    scores, _, errors, _ = h.check_vlmevalkit(tmp_path, "base", entries, before)
    assert scores == {} and errors[0].startswith("base x BLINK: md5 differs")
    assert errors[1].startswith("base x T: no entry in status.json: run.py stopped before it")
    (new / "status.json").write_text(json.dumps({"datasets": {**ok["datasets"], "T": ok["datasets"]["BLINK"]}}))
    scores, metric, errors, run = h.check_vlmevalkit(tmp_path, "base", entries, before)
    assert scores == {"BLINK": 90.0, "T": 90.0} and errors == [] and run == str(new)
    assert metric == {"BLINK": "split=none|Overall", "T": "split=none|Overall"}


def test_api_judged_benchmarks_need_a_judge(tmp_path):
    args = h.get_args(["--vlmevalkit", "--benchmarks", "MMVet", "--model", f"m={_model_dir(tmp_path / 'm')}"])
    with pytest.raises(SystemExit, match="MMVet: VLMEvalKit scores these with an API judge"):
        h.run_vlmevalkit(args, {"m": tmp_path / "m"}, tmp_path / "o", args.benchmarks, args.lmu_data)


# ---- lmms-eval: entries, yaml, results -------------------------------------------------------------------------
def test_lmms_entries_yaml_and_routes(tmp_path):
    root = tmp_path / "tasks"
    assert h.lmms_entry("BLINK", root) == ("BLINK", "blink", None)
    assert h.lmms_entry("Mantis", root) == ("Mantis", "mantis", None)
    key, task, yaml = h.lmms_entry(f"custom:My Set={tmp_path / 'd'}", root)
    assert (key, task) == ("My Set", "mia_my_set")
    assert f'include: "{root / "blink" / "_default_template_yaml"}"' in yaml
    assert f'dataset_path: "{tmp_path / "d"}"' in yaml and "load_from_disk: true" in yaml and "test_split: val" in yaml
    assert h.lmms_entry(f"MMMU={tmp_path}", root)[:2] == ("MMMU", "mia_mmmu")
    with pytest.raises(SystemExit, match="--vlmevalkit"):
        h.lmms_entry("MVBench", root)
    with pytest.raises(SystemExit, match="convert_nlvr2.py"):
        h.lmms_entry("NLVR2", root)
    with pytest.raises(SystemExit, match="custom:NAME=DIR"):
        h.lmms_entry("custom:X", root)


def test_lmms_score_error_and_sampling():
    res = {"results": {"blink": {"alias": "blink", "blink_acc,none": 0.371, "blink_acc_stderr,none": "N/A"}},
           "n-samples": {"blink": {"original": 3807, "effective": 3807}}}
    assert h.lmms_score(res, "blink", "blink_acc") == (pytest.approx(37.1), "blink_acc,none", 3807)
    assert h.lmms_score({"groups": {"g": {"m,none": 0.5}}}, "g", "m")[:2] == (50.0, "m,none")
    with pytest.raises(ValueError, match="no mantis_score for mantis"):
        h.lmms_score(res, "mantis", "mantis_score")
    log = "x\n... | ERROR | Error during evaluation: 'choices'. Please set `--verbosity=DEBUG` to get more information.\n"
    assert h.lmms_error(log) == "'choices'."
    assert h.lmms_error("Traceback ...\nKeyError: 'x'\n") == "KeyError: 'x'"
    assert h.lmms_error("all fine") is None


def test_samples_in_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("generation_kwargs:\n  max_new_tokens: 64\n  temperature: 0.2\n  do_sample: True\n")
    (tmp_path / "b.yaml").write_text("generation_kwargs:\n  temperature: 0\n  do_sample: False\n")
    assert h.samples_in_yaml(tmp_path / "a.yaml") and not h.samples_in_yaml(tmp_path / "b.yaml")


# ---- report, tiny benchmark, NLVR2 ------------------------------------------------------------------------------
def test_report_table_puts_the_paper_row_beside():
    harness = {"name": "VLMEvalKit", "version": "0.2rc1", "commit": "e8e78f05abc", "judge": "exact_matching",
               "decoding": "greedy"}
    benches = {"BLINK": {"dataset": "BLINK", "class": "ImageMCQDataset", "metric": "split=none|Overall", "paper_column": "BLINK",
                         "n": 3807, "scores": {"base": 37.0, "dpo": 42.5}},
               "MINE": {"dataset": "MINE", "class": "CustomMCQDataset", "metric": None, "paper_column": None, "n": None,
                        "scores": {"base": 10.0}}}
    text = h.report_table(harness, benches, ["base", "dpo"], {"base": {"path": "/m/b", "fingerprint": "f00"}}, "llava-1.5-7b")
    lines = text.splitlines()
    assert lines[1].split() == ["BLINK", "BLINK", "3807", "37.0", "42.5", "+5.5", "37.1", "42.9"]
    assert lines[2].split() == ["MINE", "MINE", "-", "10.0", "-", "-", "-", "-"]
    assert "harness   VLMEvalKit 0.2rc1 e8e78f05" in text and "judge     exact_matching" in text
    assert "model     base = /m/b  fingerprint f00" in text


def test_tiny_rows_are_valid_07_rows():
    scenes = [{"image": f"p/{i}.png", "color": c} for i, c in enumerate(["red", "blue", "green", "gray", "pink", "red"])]
    rows = h.tiny_rows(scenes, n=6)
    assert rows == h.tiny_rows(scenes, n=6)  # deterministic
    for r in rows:
        assert r["question"].count("<image>") == len(r["images"]) in (2, 3) and len(r["options"]) == 4
        t = int(r["question"].split("In Image")[1].split(",")[0]) - 1
        assert r["options"]["ABCD".index(r["answer"])] == scenes[[s["image"] for s in scenes].index(r["images"][t])]["color"]
        q = ev.row_question(r, "tiny.jsonl", 1, {})  # 07_eval.py scores the same rows locally
        assert q["gold"] == r["answer"] and q["question"].startswith("Image1:<image>\nImage2:<image>\n")


def test_nlvr2_rows_and_conversion(tmp_path):
    row = {"identifier": "test1-769-1-0", "sentence": " There are two dogs. ", "label": "False"}
    out = convert_nlvr2.nlvr2_row(row)
    assert out["images"] == ["test1-769-1-img0.png", "test1-769-1-img1.png"]
    assert out["question"] == ('Left image:<image>\nRight image:<image>\nIs this statement true of the two images? '
                               '"There are two dogs."')
    assert (out["options"], out["answer"], out["group"]) == (["true", "false"], "B", "NLVR2")
    src = tmp_path / "test1.json"
    src.write_text(json.dumps(row) + "\n" + json.dumps({**row, "identifier": "test1-1-0-0", "label": "True"}) + "\n")
    run = _script("convert_nlvr2.py", ["--data", str(src), "--out", str(tmp_path / "mc.jsonl")], tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(x) for x in (tmp_path / "mc.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["B", "A"] and ev.row_question(rows[1], "mc.jsonl", 2, {})["gold"] == "A"
    src.write_text(json.dumps({**row, "label": "maybe"}) + "\n")
    run = _script("convert_nlvr2.py", ["--data", str(src), "--out", str(tmp_path / "mc2.jsonl")], tmp_path)
    assert run.returncode != 0 and "test1.json:1" in run.stderr and "'maybe'" in run.stderr


# ---- one file per job: the driver, the in-harness code, the converter ------------------------------------------
def test_each_script_has_its_own_help(tmp_path):
    run = _harness(["--help"], tmp_path)
    assert run.returncode == 0 and "--vlmevalkit" in run.stdout and "--tiny" in run.stdout and "convert" not in run.stdout
    run = _script("convert_nlvr2.py", ["--help"], tmp_path)
    assert run.returncode == 0 and "--data" in run.stdout and "--out" in run.stdout and "test-P" in run.stdout
    run = _script("harness_models.py", ["--help"], tmp_path)
    assert run.returncode == 0 and "harness_models.py vlmevalkit" in run.stdout
    run = _script("harness_models.py", ["nope"], tmp_path)
    assert run.returncode != 0 and "vlmevalkit or lmms-eval, not 'nope'" in run.stderr


def test_no_stage_imports_another():
    """07_eval.py, 07_harness.py and the modules they use import no stage script (NN_name.py)."""
    import ast

    for f in ("07_eval.py", "07_harness.py", "harness_models.py", "convert_nlvr2.py", "common.py", "vlm.py"):
        tree = ast.parse((ROOT / f).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
                  and getattr(n.func, "attr", getattr(n.func, "id", None)) == "import_module"
                  and isinstance(n.args[0], ast.Constant)]
        assert not [x for x in names if x[:2].isdigit()], (f, names)


def test_tiny_run_leaves_the_flags_as_given(toy_tiny, tiny, tmp_path):
    """--tiny picks its own benchmark and data folder without rewriting args: the config names
    MIA_TINY, and args after main are the args parsed."""
    kit = tmp_path / "VLMEvalKit"
    kit.mkdir()
    (kit / "run.py").write_text("")
    args = h.get_args(["--vlmevalkit", "--vlmevalkit-dir", str(kit), "--tiny", str(tiny), "--model",
                       f"toy={toy_tiny / 'models' / 'toy-llava'}", "--out", str(tmp_path / "o"), "--dry-run"])
    before = dict(vars(args))
    assert h.main(args) is None and vars(args) == before and args.benchmarks is None
    cfg = json.loads((tmp_path / "o" / "vlmevalkit" / "config-toy.json").read_text())
    assert cfg["data"] == {"MIA_TINY": {"class": "CustomMCQDataset", "dataset": "MIA_TINY"}}
    assert h.targets(args) == (["custom:MIA_TINY"], str(tiny / "LMUData"))


# ---- errors: a clear message and a non-zero exit ---------------------------------------------------------------
def test_lora_only_checkpoints_are_refused(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(_model_dir(tmp_path / "base"))}))
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    for path, msg in ((lora, "a LoRA adapter only"), (tmp_path / "run", "a 06 output with a LoRA adapter only")):
        for harness in ("--vlmevalkit", "--lmms-eval"):
            run = _harness([harness, "--model", f"dpo={path}", "--dry-run"], tmp_path)
            assert run.returncode != 0 and msg in run.stderr and "--merge" in run.stderr, run.stderr


def test_missing_benchmark_file_stops_before_launching(tmp_path):
    kit = tmp_path / "VLMEvalKit"
    kit.mkdir()
    (kit / "run.py").write_text("raise SystemExit('run.py must not start')\n")
    (tmp_path / "LMUData").mkdir()
    run = _harness(["--vlmevalkit", "--vlmevalkit-dir", str(kit), "--lmu-data", str(tmp_path / "LMUData"), "--benchmarks",
                    "BLINK", "MMMU", "--model", f"m={_model_dir(tmp_path / 'm')}", "--out", str(tmp_path / "o")], tmp_path)
    assert run.returncode != 0
    assert "benchmark data missing" in run.stderr and str(tmp_path / "LMUData" / "BLINK.tsv") in run.stderr
    assert str(tmp_path / "LMUData" / "MMMU_DEV_VAL.tsv") in run.stderr and "must not start" not in run.stdout + run.stderr


def test_shell_passes_both_harnesses_through(tmp_path):
    for flag in ("--vlmevalkit", "--lmms-eval"):
        run = subprocess.run(["bash", str(ROOT / "07_eval.sh"), flag, "--model", f"x={tmp_path}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, env={**_env(), "PYTHON": sys.executable})
        assert run.returncode != 0 and "not a model directory" in run.stderr, run.stderr


def test_vlmevalkit_not_installed_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(h.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="VLMEvalKit is not installed. It is not on PyPI: git clone"):
        h.find_run_py(None)
    with pytest.raises(SystemExit, match="run.py is not there"):
        h.find_run_py(tmp_path)


def test_dry_run_writes_a_valid_config(tmp_path):
    kit, lmu = tmp_path / "VLMEvalKit", tmp_path / "LMUData"
    kit.mkdir(), lmu.mkdir()
    (kit / "run.py").write_text("")
    (lmu / "BLINK.tsv").write_text("")
    run = _harness(["--vlmevalkit", "--vlmevalkit-dir", str(kit), "--lmu-data", str(lmu), "--benchmarks", "BLINK",
                    "--model", f"m={_model_dir(tmp_path / 'm')}", "--out", "o", "--dry-run"], tmp_path)
    assert run.returncode == 0, run.stderr
    cfg = json.loads((tmp_path / "o" / "vlmevalkit" / "config-m.json").read_text())
    assert cfg["model"]["m"]["class"] == hm.MODEL_CLASS and cfg["model"]["m"]["model_path"] == str(tmp_path / "m")
    assert cfg["data"] == {"BLINK": {"class": "ImageMCQDataset", "dataset": "BLINK"}}
    assert f"--work-dir {tmp_path / 'o' / 'vlmevalkit' / 'work'}" in run.stdout and "--judge exact_matching" in run.stdout


@pytest.mark.slow
def test_torchvision_stand_in_keeps_transformers_on_pil(toy_tiny):
    """Where torchvision does not import, VLMEvalKit-style module-level uses work, transformers and
    vlm.load_processor still load the toy's PIL image processor (one answer: torchvision_problem, not
    fooled by the stand-in), and a real call fails naming torchvision."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("a torchvision is installed here: the launcher uses it when it imports")
    code = f"""
import importlib, sys
import vlm
print(vlm.torchvision_or_stand_in())
import torchvision, torchvision.transforms as T
from torchvision.transforms.functional import InterpolationMode
from torchvision import transforms
def f(x, mode=InterpolationMode.BICUBIC): return x
class Mine(T.Compose): pass
import transformers.utils.import_utils as iu
from transformers import AutoProcessor
proc = AutoProcessor.from_pretrained({str(toy_tiny / 'models' / 'toy-llava')!r}, local_files_only=True)
ours = vlm.load_processor({str(toy_tiny / 'models' / 'toy-llava')!r})
print(iu.is_torchvision_available(), type(proc.image_processor).__name__, type(ours.image_processor).__name__)
print(vlm.torchvision_problem() == vlm.torchvision_or_stand_in())
try:
    transforms.Resize(3)
except ModuleNotFoundError as e:
    print("call:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ModuleNotFoundError") and lines[1].split()[0] == "False"
    assert all(c.endswith("Pil") for c in lines[1].split()[1:]) and lines[2] == "True"
    assert "torchvision.transforms.Resize: torchvision is not importable here" in lines[3]


# ---- real runs on the toy model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(toy_tiny, tmp_path_factory):
    """The 6-row tiny benchmark in 07's, VLMEvalKit's and lmms-eval's formats (the last needs `datasets`)."""
    pytest.importorskip("datasets")
    out = tmp_path_factory.mktemp("tiny")
    h.write_tiny(out, toy_tiny / "data" / "toy" / "heldout.json", toy_tiny / "data" / "toy" / "images")
    return out


def _toy_args(toy_tiny, tiny, out, harness):
    kit = ["--vlmevalkit-dir", VLMEVALKIT_DIR] if harness == "--vlmevalkit" and VLMEVALKIT_DIR else []
    return [harness, *kit, "--tiny", str(tiny), "--model", f"toy={toy_tiny / 'models' / 'toy-llava'}", "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "8", "--toy-split", str(toy_tiny / "data" / "toy" / "heldout.json"),
            "--image-root", str(toy_tiny / "data" / "toy" / "images")]


def _fingerprint(model_dir):
    model, _ = vlm.load_model(model_dir)
    return vlm.model_fingerprint(model)


@pytest.mark.slow
@needs_vlmevalkit
def test_vlmevalkit_end_to_end_on_the_toy(toy_tiny, tiny, tmp_path):
    """VLMEvalKit does the inference (our class) and the scoring; the report reads its status.json. Its
    answers are 07_eval.py's answers to the same rows: one prompt builder for both."""
    run = _harness(_toy_args(toy_tiny, tiny, tmp_path / "o", "--vlmevalkit"), tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "vlmevalkit" / "report.json").read_text())
    b = report["benchmarks"]["MIA_TINY"]
    assert b["n"] == 6 and b["class"] == "CustomMCQDataset" and 0 <= b["scores"]["toy"] <= 100 and report["errors"] == []
    assert report["models"]["toy"]["fingerprint"] == _fingerprint(toy_tiny / "models" / "toy-llava")
    assert report["harness"]["judge"] == "exact_matching" and report["harness"]["name"] == "VLMEvalKit"
    import csv

    pred = Path(report["harness"]["runs"]["toy"]) / "toy_MIA_TINY.tsv"
    with open(pred, newline="") as f:
        harness_answers = {f"tiny-{r['index']}": r["prediction"] for r in csv.DictReader(f, delimiter="\t")}
    local = subprocess.run([sys.executable, str(ROOT / "07_eval.py"), "--model", f"toy={toy_tiny / 'models' / 'toy-llava'}",
                            "--data", str(tiny / "mc.jsonl"), "--image-root", str(toy_tiny / "data" / "toy" / "images"),
                            "--out", str(tmp_path / "local"), "--max-new-tokens", "8", "--no-pairs"],
                           capture_output=True, text=True, timeout=300, env=_env())
    assert local.returncode == 0, local.stderr
    local_answers = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "local" / "answers-toy.jsonl").open())}
    assert harness_answers == local_answers


@pytest.mark.slow
@needs_vlmevalkit
def test_vlmevalkit_dataset_errors_fail_the_run(toy_tiny, tiny, tmp_path):
    """run.py exits 0 when a dataset fails; 07 reads status.json and exits non-zero with the dataset's own
    error: a corrupt image inside the harness, and a BLINK.tsv that VLMEvalKit would download again."""
    import csv

    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    (lmu / "BLINK.tsv").write_text((tiny / "LMUData" / "MIA_TINY.tsv").read_text())  # not VLMEvalKit's MD5
    with open(tiny / "LMUData" / "MIA_TINY.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    junk = base64.b64encode(b"not an image " * 8).decode()  # > 64 characters: VLMEvalKit decodes it
    rows[1][1] = json.dumps([junk, junk])
    with open(lmu / "BAD.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows[:2])
    kit = ["--vlmevalkit-dir", VLMEVALKIT_DIR] if VLMEVALKIT_DIR else []
    run = _harness(["--vlmevalkit", *kit, "--lmu-data", str(lmu), "--benchmarks", "BLINK", "custom:BAD", "--model",
                    f"toy={toy_tiny / 'models' / 'toy-llava'}", "--out", str(tmp_path / "o"), "--device", "cpu",
                    "--max-new-tokens", "4"], tmp_path, timeout=900)
    assert run.returncode != 0
    assert "2 benchmark runs produced no score" in run.stderr
    assert "toy x BLINK: VLMEvalKit tried to download" in run.stdout
    assert "toy x BAD: cannot identify image file" in run.stdout, run.stdout[-3000:]


@pytest.mark.slow
@needs_lmms
def test_lmms_eval_end_to_end_on_the_toy(toy_tiny, tiny, tmp_path):
    """lmms-eval does the inference (our class, greedy forced) and the scoring with its BLINK code; the
    report reads its results file. The samples show each image at its place in the prompt."""
    run = _harness(_toy_args(toy_tiny, tiny, tmp_path / "o", "--lmms-eval"), tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "lmms-eval" / "report.json").read_text())
    b = report["benchmarks"]["MIA_TINY"]
    assert b["n"] == 6 and b["task"] == "mia_mia_tiny" and b["metric"] == "blink_acc,none" and 0 <= b["scores"]["toy"] <= 100
    assert report["models"]["toy"]["fingerprint"] == _fingerprint(toy_tiny / "models" / "toy-llava")
    assert report["harness"]["version"] == "0.7.3" and "greedy forced" in report["harness"]["decoding"]
    samples = list((tmp_path / "o" / "lmms-eval" / "results" / "toy").rglob("*_samples_mia_mia_tiny.jsonl"))
    docs = [json.loads(x) for x in samples[0].read_text().splitlines()]
    assert len(docs) == 6 and all("Image1:<image>\nImage2:<image>\n" in d["input"] for d in docs)
    cfg = json.loads(Path(report["harness"]["results"]["toy"]).read_text())["configs"]["mia_mia_tiny"]
    assert cfg["generation_kwargs"]["temperature"] == 0 and cfg["generation_kwargs"]["do_sample"] is False


@pytest.mark.slow
@needs_lmms
def test_lmms_eval_dataset_error_fails_the_run(toy_tiny, tiny, tmp_path):
    """lmms-eval prints a task's error and exits 0; 07 finds no results file and exits non-zero with it."""
    import datasets

    broken = datasets.load_from_disk(str(tiny / "lmms"))
    broken["val"] = broken["val"].remove_columns("choices")
    broken.save_to_disk(str(tmp_path / "broken"))
    run = _harness(["--lmms-eval", "--benchmarks", f"custom:BROKEN={tmp_path / 'broken'}", "--model",
                    f"toy={toy_tiny / 'models' / 'toy-llava'}", "--out", str(tmp_path / "o"), "--device", "cpu",
                    "--max-new-tokens", "4"], tmp_path, timeout=900)
    assert run.returncode != 0 and "1 benchmark runs produced no score" in run.stderr
    assert "toy: lmms-eval wrote no results (exit code 0): 'choices'" in run.stdout, run.stdout[-3000:]
    run = _harness(["--lmms-eval", "--benchmarks", f"BLINK={tmp_path / 'nothing'}", "--model",
                    f"toy={toy_tiny / 'models' / 'toy-llava'}", "--out", str(tmp_path / "o2")], tmp_path)
    assert run.returncode != 0 and "is not a datasets.save_to_disk folder" in run.stderr
