"""
07_harness.py — stage 7 on the paper's own benchmarks: VLMEvalKit or lmms-eval scores local
checkpoints with our model class, this script checks that every benchmark really produced a score
(never trusting the harness's exit code) and puts the models side by side with the paper's row.
in : local models + benchmark data placed beforehand    out: OUT/<harness>/report.json, report.txt
  bash 07_eval.sh --vlmevalkit --model base=llava-1.5-7b-hf --model dpo=out/mia-dpo/final   # BLINK MMMU MVBench
  bash 07_eval.sh --lmms-eval --model base=llava-1.5-7b-hf --model dpo=out/mia-dpo/final    # BLINK MMMU Mantis
  python 07_harness.py --vlmevalkit --tiny out/tiny --model base=models/toy-llava   # the toy on a CPU, minutes
  python convert_nlvr2.py --data nlvr2/test1.json --out nlvr2_mc.jsonl              # NLVR2 for 07_eval.py

The paper's five multi-image columns (its Table 1) and what reproduces each:
  column   VLMEvalKit (dataset: class)                    lmms-eval (task)
  MMMU     MMMU_DEV_VAL: MMMUDataset (its validation row)  mmmu_val (the 900 validation questions)
  BLINK    BLINK: ImageMCQDataset                          blink (its 14 subtasks, val split)
  Mantis   - (no such VLMEvalKit dataset)                  mantis (its yaml samples at T 0.2; greedy is forced)
  NLVR2    - (no such VLMEvalKit dataset)                  - (only a NLVR2_Mantis subset inside
           the paper's 6,967 = NLVR2 test-P: `convert_nlvr2.py`  llava_interleave_bench, another sample)
           writes 07's multiple-choice rows, 07_eval.py scores them
  MVBench  MVBench, 8 frames as images: MVBench            - (its task hands over video files, which
           (read from the HF cache of OpenGVLab/MVBench)      LLaVA-1.5's processor cannot take)
VLMEvalKit also runs the paper's single-image set (MMStar, ScienceQA_TEST, POPE, MMBench_DEV_EN,
AI2D_TEST; MMVet and MathVista_MINI only with an API judge). `custom:NAME` runs any file in VLMEvalKit's
multiple-choice TSV format ($LMUData/NAME.tsv, CustomMCQDataset: no MD5 check, never downloaded) or, for
lmms-eval, `custom:NAME=DIR`: a `datasets.save_to_disk` folder in BLINK's schema, scored by lmms-eval's
own BLINK code (`BLINK=DIR` does the same for a saved copy of the real BLINK).

Our model class (MIADPO_HF in VLMEvalKit, mia_hf in lmms-eval, in harness_models.py) answers with the
stages' own prompt builder, greedily, LLaVA-1.5's multiple-choice wording in VLMEvalKit; this script
writes each harness's config and runs it through harness_models.py's launcher, in its own process
(torchrun / accelerate for several GPUs). harness_models.py's docstring says how the class prompts
and what stands in for torchvision where it does not import.

What makes a run fail (non-zero exit, the harness's own error message): a benchmark file that is not
there (checked before launching; VLMEvalKit's downloads are switched off unless --allow-download, so a
file whose MD5 differs from its built-in one fails instead of being fetched again), a benchmark whose
status.json entry (VLMEvalKit) or results file (lmms-eval) holds no score, a LoRA-only checkpoint (the
harnesses load full weights: 06 --merge writes OUT/final).
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common
import harness_models
import vlm
from harness_models import LMMS_MODEL, MODEL_CLASS

HERE = Path(__file__).resolve().parent

# ---- the paper's benchmarks and where each harness keeps them (edit me) -----------------------------
# Table 1 of the paper (accuracy, %): the five multi-image benchmarks.
PAPER = {
    "llava-1.5-7b": {"MMMU": (35.1, 36.3), "BLINK": (37.1, 42.9), "Mantis": (41.9, 44.2), "NLVR2": (52.1, 54.2),
                     "MVBench": (36.0, 39.5)},
    "internlm-xc2.5-7b": {"MMMU": (41.4, 42.6), "BLINK": (46.9, 47.7), "Mantis": (49.3, 60.4), "NLVR2": (70.7, 75.2),
                          "MVBench": (59.5, 63.6)},
}
NO_VLMEVALKIT = {
    "Mantis": "Mantis-Eval is not a VLMEvalKit dataset: run it with --lmms-eval (task mantis)",
    "NLVR2": "NLVR2 is in neither harness: `python convert_nlvr2.py` writes its test-P split as 07's "
             "multiple-choice rows, which 07_eval.py scores",
}
NO_LMMS = {
    "NLVR2": NO_VLMEVALKIT["NLVR2"] + " (lmms-eval's llava_interleave_bench holds only a NLVR2_Mantis subset)",
    "MVBench": "lmms-eval's mvbench passes video files, which LLaVA-1.5's processor cannot take: run it with "
               "--vlmevalkit (MVBench, 8 frames as images)",
}
# VLMEvalKit: benchmark -> its --config data entry (`class` + `dataset` are required by run.py)
VLMEVALKIT = {
    "MMMU": {"class": "MMMUDataset", "dataset": "MMMU_DEV_VAL"},
    "BLINK": {"class": "ImageMCQDataset", "dataset": "BLINK"},
    "MVBench": {"class": "MVBench", "dataset": "MVBench", "nframe": 8},
    "MMStar": {"class": "ImageMCQDataset", "dataset": "MMStar"},
    "ScienceQA_TEST": {"class": "ImageMCQDataset", "dataset": "ScienceQA_TEST"},
    "POPE": {"class": "ImageYORNDataset", "dataset": "POPE"},
    "MMBench_DEV_EN": {"class": "ImageMCQDataset", "dataset": "MMBench_DEV_EN"},
    "AI2D_TEST": {"class": "ImageMCQDataset", "dataset": "AI2D_TEST"},
    "MMVet": {"class": "MMVet", "dataset": "MMVet"},
    "MathVista_MINI": {"class": "MathVista", "dataset": "MathVista_MINI"},
}
VLMEVALKIT_SPLIT = {"MMMU": "validation"}  # the status.json row that is the paper's column
API_JUDGED = {"MMVet", "MathVista_MINI"}  # VLMEvalKit asserts a working API judge for these
PAPER_VLMEVALKIT = ["MMMU", "BLINK", "MVBench"]
# lmms-eval: benchmark -> its task, the task's yaml (under lmms_eval/tasks), split and metric
LMMS = {
    "MMMU": {"task": "mmmu_val", "yaml": "mmmu/mmmu_val.yaml", "split": "validation", "metric": "mmmu_acc"},
    "BLINK": {"task": "blink", "yaml": "blink/_default_template_yaml", "split": "val", "metric": "blink_acc"},
    "Mantis": {"task": "mantis", "yaml": "mantis/mantis.yaml", "split": "test", "metric": "mantis_score"},
}
PAPER_LMMS = ["MMMU", "BLINK", "Mantis"]
GREEDY_GEN_KWARGS = "temperature=0,do_sample=False"  # lmms-eval: CLI gen_kwargs override every task's yaml


# ---- VLMEvalKit: config, files, status -----------------------------------------------------------------
def vlmevalkit_entry(name):
    """A benchmark name -> (our key, VLMEvalKit data entry). Known names (MMMU or MMMU_DEV_VAL, BLINK,
    MVBench, single-image names) use VLMEvalKit's class; custom:NAME reads $LMUData/NAME.tsv as
    CustomMCQDataset. Mantis and NLVR2 -> SystemExit naming their route."""
    if name.startswith("custom:"):
        return name[7:], {"class": "CustomMCQDataset", "dataset": name[7:]}
    if name in NO_VLMEVALKIT:
        raise SystemExit(f"--benchmarks {name}: {NO_VLMEVALKIT[name]}")
    for key, entry in VLMEVALKIT.items():
        if name in (key, entry["dataset"]):
            return key, dict(entry)
    raise SystemExit(f"--benchmarks {name}: not a benchmark 07 knows for VLMEvalKit ({', '.join(VLMEVALKIT)}, "
                     f"or custom:NAME for $LMUData/NAME.tsv)")


def vlmevalkit_config(models, entries, model_kwargs):
    """run.py's --config: each model as our class on its absolute directory (+ a record file to describe
    it in), each benchmark keyed by its VLMEvalKit dataset name (which names the prediction files)."""
    return {"model": {name: {"class": MODEL_CLASS, "model_path": str(Path(d).resolve()), **model_kwargs.get(name, {})}
                      for name, d in models.items()},
            "data": {e["dataset"]: e for e in entries.values()}}


def missing_files(entries, lmu, hub_cache):
    """Benchmark data VLMEvalKit would have to download -> list of what is missing (a TSV under
    $LMUData, or MVBench's HF cache of OpenGVLab/MVBench)."""
    out = []
    for e in entries.values():
        if e["class"] == "MVBench":
            if not (Path(hub_cache) / "datasets--OpenGVLab--MVBench").is_dir():
                out.append(f"the HF cache of OpenGVLab/MVBench ({Path(hub_cache) / 'datasets--OpenGVLab--MVBench'})")
        elif not (Path(lmu) / f"{e['dataset']}.tsv").is_file():
            out.append(str(Path(lmu) / f"{e['dataset']}.tsv"))
    return out


def vlmevalkit_command(run_py, config, work, nproc, judge):
    """The launch: our launcher (harness_models.py) runs VLMEvalKit's run.py in its own process (torchrun
    for several GPUs, from this Python: `python -m torch.distributed.run`)."""
    head = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else [])
    return head + [str(HERE / "harness_models.py"), "vlmevalkit", str(run_py), "--config", str(config),
                   "--work-dir", str(work), "--mode", "all", "--judge", judge]


def run_dirs(work, model):
    """VLMEvalKit's run folders of one model (<work>/<model>/T<date>-<time>/), oldest first."""
    d = Path(work) / model
    return sorted(p for p in d.glob("T*") if p.is_dir()) if d.is_dir() else []


def percent(value):
    """VLMEvalKit stores accuracies as fractions: 0.372 -> 37.2 (a value above 1 is already a percentage)."""
    return 100 * float(value) if float(value) <= 1 else float(value)


def vlmevalkit_score(key, ds):
    """One benchmark's status.json entry -> (score %, metric name), or raises ValueError with the
    reason there is none: VLMEvalKit's own error message, its skip reason, or no `Overall` metric."""
    if "error_message" in ds:  # run.py caught an exception here; an assert leaves its message empty
        raise ValueError(ds["error_message"] or "failed with an empty message (an assert inside VLMEvalKit; its "
                         "traceback is in the harness log)")
    if ds.get("skip_reason"):
        raise ValueError(f"skipped: {ds['skip_reason']}")
    if ds.get("status") != "done":
        raise ValueError(f"stopped at status {ds.get('status')!r}")
    metrics = ds.get("metrics") or {}
    overall = {k.split("|")[0].removeprefix("split="): k for k in metrics if k == "Overall" or k.endswith("|Overall")}
    split = VLMEVALKIT_SPLIT.get(key)
    if split in overall:
        return percent(metrics[overall[split]]), overall[split]
    if len(overall) == 1:
        k = next(iter(overall.values()))
        return percent(metrics[k]), k
    raise ValueError(f"no single Overall score among its metrics ({', '.join(metrics) or 'none'})")


def check_vlmevalkit(work, name, entries, before, code=None):
    """Read one model's new run folder (not in `before`) -> ({key: score}, {key: metric}, errors, run dir)."""
    new = [d for d in run_dirs(work, name) if d not in before]
    status_file = new[-1] / "status.json" if new else None
    if status_file is None or not status_file.is_file():
        return {}, {}, [f"{name}: VLMEvalKit wrote no status.json under {Path(work) / name} (exit code {code}; see its "
                        f"output above)"], None
    status = json.loads(status_file.read_text())
    scores, metric, errors = {}, {}, []
    for key, e in entries.items():
        ds = status.get("datasets", {}).get(e["dataset"])
        try:
            if ds is None:
                raise ValueError("no entry in status.json: run.py stopped before it")
            scores[key], metric[key] = vlmevalkit_score(key, ds)
        except ValueError as err:
            errors.append(f"{name} x {e['dataset']}: {err}  ({status_file})")
    return scores, metric, errors, str(new[-1])


def prediction_rows(run_dir, model, dataset):
    """Rows in a VLMEvalKit prediction file (PRED_FORMAT=tsv), or None."""
    import csv

    f = Path(run_dir) / f"{model}_{dataset}.tsv"
    if not f.is_file():
        return None
    with open(f, newline="", encoding="utf-8") as fh:
        return max(0, sum(1 for _ in csv.reader(fh, delimiter="\t")) - 1)


def git_commit(path):
    """The git commit of a checkout (or None): provenance of a harness run from a clone."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def find_run_py(root):
    """VLMEvalKit's run.py: in --vlmevalkit-dir, or beside an editable install of `vlmeval`."""
    if root:
        run_py = Path(root) / "run.py"
    else:
        spec = importlib.util.find_spec("vlmeval")
        if spec is None or not spec.origin:
            raise SystemExit("VLMEvalKit is not installed. It is not on PyPI: git clone "
                             "https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit "
                             "(then pass --vlmevalkit-dir VLMEvalKit, or run from an editable install)")
        run_py = Path(spec.origin).parent.parent / "run.py"  # an editable install: <repo>/vlmeval/__init__.py
    if not run_py.is_file():
        raise SystemExit(f"{run_py}: VLMEvalKit's run.py is not there; pass --vlmevalkit-dir <your VLMEvalKit clone>")
    return run_py.resolve()


def vlmevalkit_version(run_py):
    text = (run_py.parent / "vlmeval" / "__init__.py").read_text(encoding="utf-8", errors="replace")
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else None


def run_vlmevalkit(args, models, out, benchmarks, lmu_data):
    """Config -> run.py (through the launcher) -> scores read back from status.json."""
    entries = dict(vlmevalkit_entry(b) for b in benchmarks)
    if args.judge == "exact_matching" and API_JUDGED & set(entries):
        raise SystemExit(f"{', '.join(sorted(API_JUDGED & set(entries)))}: VLMEvalKit scores these with an API judge "
                         f"only; pass --judge gpt-4o-mini (with OPENAI_API_KEY set) or leave them out")
    run_py = find_run_py(args.vlmevalkit_dir)
    lmu = Path(lmu_data).resolve()
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    missing = missing_files(entries, lmu, hub)
    if missing and not args.allow_download:
        raise SystemExit("benchmark data missing (VLMEvalKit would download it; --allow-download lets it):\n  "
                         + "\n  ".join(missing) + "\nPlace each file there first (e.g. VLMEvalKit's own download on a "
                         "machine with network), or pass --lmu-data DIR.")
    work = out / "work"
    env = {**os.environ, "LMUData": str(lmu), "PRED_FORMAT": "tsv", "PYTHONPATH": _pythonpath()}
    if not args.allow_download:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MIA_NO_DOWNLOAD="1")
    scores, metric, errors, runs, codes = {}, {}, [], {}, {}
    for name, d in models.items():  # one run.py per model: it would hold two models in memory at once
        kwargs = {"device": args.device, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens or 2048,
                  "record": str(out / f"model-{name}.json")}
        config = out / f"config-{name}.json"
        with common.atomic_write(config) as f:
            json.dump(vlmevalkit_config({name: d}, entries, {name: kwargs}), f, indent=1)
        cmd = vlmevalkit_command(run_py, config, work, args.nproc or _gpu_count(), args.judge)
        before = run_dirs(work, name)
        codes[name] = _run(cmd, run_py.parent, env, out / f"harness-{name}.log", args.dry_run)
        if args.dry_run:
            continue
        got, m, err, runs[name] = check_vlmevalkit(work, name, entries, before, codes[name])
        for key, v in got.items():
            scores.setdefault(key, {})[name] = v
        metric.update(m)
        errors += err
    if args.dry_run:
        return None
    runs = {n: r for n, r in runs.items() if r}
    benches = {k: {"dataset": e["dataset"], "class": e["class"], "metric": metric.get(k), "paper_column": _column(k),
                   "n": _first(prediction_rows(runs[n], n, e["dataset"]) for n in runs),
                   "file": None if e["class"] == "MVBench" else str(lmu / f"{e['dataset']}.tsv"),
                   "scores": scores.get(k, {})} for k, e in entries.items()}
    harness = {"name": "VLMEvalKit", "version": vlmevalkit_version(run_py), "commit": git_commit(run_py.parent),
               "run_py": str(run_py), "exit_codes": codes, "judge": args.judge, "lmu_data": str(lmu), "runs": runs,
               "decoding": f"greedy (do_sample=False), max_new_tokens {args.max_new_tokens or 2048}, class {MODEL_CLASS} "
                           f"(07_harness.py): LLaVA-1.5 multiple-choice wording, the checkpoint's chat template"}
    return harness, benches, errors


# ---- lmms-eval: tasks, results ---------------------------------------------------------------------------
def lmms_entry(spec, tasks_root):
    """A benchmark spec -> (our key, task name, yaml text or None). `BLINK` / `MMMU` / `Mantis`: the stock
    task, data from the HF cache; `BLINK=DIR`: the same task on a `save_to_disk` folder; `custom:NAME=DIR`:
    a folder in BLINK's schema, scored by lmms-eval's BLINK code, labelled NAME."""
    name, _, local = spec.partition("=")
    custom = name.startswith("custom:")
    base = "BLINK" if custom else name
    if base in NO_LMMS:
        raise SystemExit(f"--benchmarks {spec}: {NO_LMMS[base]}")
    if base not in LMMS:
        raise SystemExit(f"--benchmarks {spec}: not a benchmark 07 knows for lmms-eval ({', '.join(LMMS)}, NAME=DIR "
                         f"for a saved copy, or custom:NAME=DIR)")
    if custom and not local:
        raise SystemExit(f"--benchmarks {spec}: custom:NAME=DIR (a datasets.save_to_disk folder in BLINK's schema)")
    key = name[7:] if custom else name
    t = LMMS[base]
    if not local:
        return key, t["task"], None
    task = f"mia_{re.sub(r'[^0-9a-z]+', '_', key.lower())}"
    yaml = lmms_task_yaml(task, Path(tasks_root) / t["yaml"], Path(local).resolve(), t["split"])
    return key, task, yaml


def lmms_task_yaml(task, template, data_dir, split):
    """An lmms-eval task on local data: the stock task's yaml included whole (prompts, generation
    settings, process_results, metric: lmms-eval's own code), only the data replaced by a saved folder."""
    return (f"# written by 07_harness.py: lmms-eval's {template.parent.name} task on a local dataset\n"
            f"include: {json.dumps(str(template))}\ntask: {task}\ndataset_path: {json.dumps(str(data_dir))}\n"
            f"dataset_name: null\ndataset_kwargs:\n  load_from_disk: true\ntest_split: {split}\n")


def lmms_command(task_names, include, model_args, out, nproc):
    """The launch of one model: our launcher (harness_models.py) runs lmms-eval's CLI (`accelerate launch`
    for several GPUs)."""
    head = [sys.executable] + (["-m", "accelerate.commands.launch", f"--num_processes={nproc}"] if nproc > 1 else [])
    return head + [str(HERE / "harness_models.py"), "lmms-eval", "--model", LMMS_MODEL, "--model_args", model_args,
                   "--tasks", ",".join(task_names), "--batch_size", "1", "--gen_kwargs", GREEDY_GEN_KWARGS,
                   "--output_path", str(out), "--log_samples"] + (["--include_path", str(include)] if include else [])


def lmms_score(results, task, metric):
    """lmms-eval's results.json -> (score %, metric key, n), or ValueError: the task (or its group)
    has no `<metric>,<filter>` value."""
    for section in ("results", "groups"):
        row = results.get(section, {}).get(task)
        if row:
            keys = [k for k in row if k.split(",")[0] == metric and not k.endswith("_stderr")]
            if keys:
                n = results.get("n-samples", {}).get(task, {}).get("effective")
                return 100 * float(row[keys[0]]), keys[0], n
    raise ValueError(f"no {metric} for {task} in the results file")


def lmms_error(log_text):
    """lmms-eval's own error message from its output (it prints it, then exits 0), or None."""
    hits = re.findall(r"Error during evaluation: (.*?)(?: Please set `--verbosity=DEBUG`|$)", log_text, re.M)
    if hits:
        return hits[-1]
    tb = re.findall(r"^(\w+(?:Error|Exception): .*)$", log_text, re.M)
    return tb[-1] if tb else None


def samples_in_yaml(path):
    """Does a task yaml ask for sampling (temperature > 0 or do_sample true)? mantis.yaml: T 0.2 -> True."""
    text = Path(path).read_text(encoding="utf-8")
    temps = [float(t) for t in re.findall(r"^\s*temperature:\s*([0-9.]+)\s*$", text, re.M)]
    return any(t > 0 for t in temps) or bool(re.search(r"^\s*do_sample:\s*true\s*$", text, re.M | re.I))


def run_lmms(args, models, out, benchmarks):
    """Task yamls -> lmms-eval once per model (through the launcher) -> scores read from results.json."""
    tasks_root = _lmms_tasks_root()
    task_dir = out / "tasks"
    entries = {}
    for spec in benchmarks:
        key, task, yaml = lmms_entry(spec, tasks_root)
        local = spec.partition("=")[2] or None
        if yaml is not None:
            if not (Path(local) / "dataset_dict.json").is_file():
                raise SystemExit(f"--benchmarks {spec}: {local} is not a datasets.save_to_disk folder (no dataset_dict.json)")
            with common.atomic_write(task_dir / f"{task}.yaml") as f:
                f.write(yaml)
        base = LMMS["BLINK" if spec.startswith("custom:") else key]
        entries[key] = {"task": task, "metric": base["metric"], "local": local, "based_on": base["task"],
                        "samples": samples_in_yaml(tasks_root / base["yaml"])}
    nproc = args.nproc or _gpu_count()
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if not args.allow_download:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    scores, metric, ns, errors, files, codes = {}, {}, {}, [], {}, {}
    for name, d in models.items():
        model_args = (f"pretrained={d},device={args.device},dtype={args.dtype},max_new_tokens={args.max_new_tokens},"
                      f"record={out / f'model-{name}.json'}")
        res_dir = out / "results" / name
        before = set(res_dir.rglob("*_results.json")) if res_dir.is_dir() else set()
        cmd = lmms_command([e["task"] for e in entries.values()], task_dir if task_dir.is_dir() else None,
                           model_args, res_dir, nproc)
        log = out / f"harness-{name}.log"
        codes[name] = _run(cmd, out, env, log, args.dry_run)
        if args.dry_run:
            continue
        new = sorted(set(res_dir.rglob("*_results.json")) - before)
        if not new:
            msg = lmms_error(log.read_text(encoding="utf-8", errors="replace")) or "see its output above"
            errors.append(f"{name}: lmms-eval wrote no results (exit code {codes[name]}): {msg}  ({log})")
            continue
        files[name] = str(new[-1])
        results = json.loads(new[-1].read_text())
        for key, e in entries.items():
            try:
                s, metric[key], ns[key] = lmms_score(results, e["task"], e["metric"])
                scores.setdefault(key, {})[name] = s
            except ValueError as err:
                errors.append(f"{name} x {e['task']}: {err}  ({new[-1]})")
    if args.dry_run:
        return None
    benches = {k: {"dataset": e["local"] or f"{e['task']} (HF cache)", "task": e["task"], "based_on": e["based_on"],
                   "metric": metric.get(k),
                   "paper_column": _column(k), "n": ns.get(k), "scores": scores.get(k, {})} for k, e in entries.items()}
    sampled = sorted(e["task"] for e in entries.values() if e["samples"])
    harness = {"name": "lmms-eval", "version": _dist_version("lmms_eval"), "results": files, "exit_codes": codes,
               "judge": "none (each task's own answer parser)",
               "decoding": f"greedy forced over every task's yaml ({GREEDY_GEN_KWARGS}"
                           + (f"; {', '.join(sampled)} would sample" if sampled else "") + "), max_new_tokens "
                           f"{args.max_new_tokens or 'of each task'}, model {LMMS_MODEL} (07_harness.py)"}
    return harness, benches, errors


# ---- report ---------------------------------------------------------------------------------------------
def _column(key):
    return key if key in PAPER["llava-1.5-7b"] else None


def report_table(harness, benches, names, models_info, paper_row):
    """The side-by-side text: one row per benchmark (score of each model, the change for two, the
    paper's base and MIA-DPO numbers where the benchmark is one of its columns), then provenance."""
    paper = PAPER[paper_row]
    w = max(12, *(len(n) + 2 for n in names))
    head = f"{'benchmark':<12}{'dataset':<34}{'n':>6}" + "".join(f"{n:>{w}}" for n in names)
    head += (f"{'change':>8}" if len(names) == 2 else "") + f"{'paper base':>12}{'paper MIA-DPO':>15}"
    lines = [head]
    for key, b in benches.items():
        cells = [b["scores"].get(n) for n in names]
        row = f"{key:<12}{b['dataset'][-33:]:<34}{b['n'] if b['n'] is not None else '-':>6}"
        row += "".join(f"{c:>{w}.1f}" if c is not None else f"{'-':>{w}}" for c in cells)
        if len(names) == 2:
            row += f"{cells[1] - cells[0]:>+8.1f}" if None not in cells else f"{'-':>8}"
        p = paper.get(b["paper_column"] or "")
        row += f"{p[0]:>12.1f}{p[1]:>15.1f}" if p else f"{'-':>12}{'-':>15}"
        lines.append(row)
    version = " ".join(str(x) for x in (harness.get("version"), (harness.get("commit") or "")[:8]) if x)
    lines += ["", f"harness   {harness['name']} {version}".rstrip(), f"judge     {harness['judge']}",
              f"decoding  {harness['decoding']}", f"paper     {paper_row} row of the paper's Table 1 (accuracy, %)"]
    for key, b in benches.items():
        what = b.get("class") or b["task"] + (f": lmms-eval's {b['based_on']} task" if b.get("based_on") != b["task"] else "")
        lines.append(f"data      {key}: {b['dataset']} ({what}), metric {b['metric'] or '-'}")
    for n in names:
        m = models_info.get(n, {})
        lines.append(f"model     {n} = {m.get('path', '?')}  fingerprint {m.get('fingerprint', '?')}  "
                     f"{m.get('dtype', '')} on {m.get('device', '?')}".rstrip())
    return "\n".join(lines)


def write_report(out, harness, benches, errors, models, args, benchmarks=None):
    """OUT/report.json + report.txt (+ sidecar, with the benchmarks run); prints the table and the errors."""
    info = {}
    for n in models:
        f = out / f"model-{n}.json"
        info[n] = json.loads(f.read_text()) if f.is_file() else {"path": str(models[n])}
    text = report_table(harness, benches, list(models), info, args.paper_row)
    if errors:
        text += "\n\nNO SCORE:\n" + "\n".join(f"  {e}" for e in errors)
    print(text)
    report = {"harness": harness, "models": info, "benchmarks": benches, "errors": errors, "paper_row": args.paper_row}
    with common.atomic_write(out / "report.json") as f:
        json.dump(report, f, indent=1)
    with common.atomic_write(out / "report.txt") as f:
        f.write(text + "\n")
    common.write_sidecar(out / "report.json", args, counts={"benchmarks": len(benches), "errors": len(errors)},
                         benchmarks=benchmarks)
    return report


# ---- the tiny benchmark: toy images in both harnesses' own formats ----------------------------------------
def tiny_rows(scenes, n=6, seed=0):
    """n multi-image multiple-choice rows from toy scenes (dicts: image, color): 2-3 images each, in
    MIA's sequence format ("Image1:<image>\\nImage2:<image>\\nIn Image2, what color is the shape?"),
    four colour options (the asked one, the other images', fillers), answer a letter. Deterministic."""
    import random

    rng = random.Random(seed)
    colours = sorted({s["color"] for s in scenes})
    rows = []
    for i in range(n):
        k = 2 + i % 2
        pick = rng.sample(scenes, k)
        t = rng.randrange(k)
        gold = pick[t]["color"]
        opts = list(dict.fromkeys([gold] + [s["color"] for s in pick] + rng.sample(colours, len(colours))))[:4]
        rng.shuffle(opts)
        q = "".join(f"Image{j + 1}:<image>\n" for j in range(k)) + f"In Image{t + 1}, what color is the shape?"
        rows.append({"id": f"tiny-{i}", "images": [s["image"] for s in pick], "question": q, "options": opts,
                     "answer": "ABCD"[opts.index(gold)], "group": f"sequence {k}"})
    return rows


def _b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


def write_tiny(out, toy_split, image_root, n=6):
    """OUT/mc.jsonl (07's own format), OUT/LMUData/MIA_TINY.tsv (VLMEvalKit's multiple-choice TSV,
    images inline as base64) and OUT/lmms/ (a datasets.save_to_disk folder in BLINK's schema)."""
    import csv

    scenes = [{"image": r["image"], "color": r["toy"]["color"]} for _, r in common.read_rows(toy_split) if "toy" in r]
    rows = tiny_rows(scenes, n)
    common.write_jsonl(out / "mc.jsonl", rows)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
    for i, r in enumerate(rows):
        w.writerow([i, json.dumps([_b64(Path(image_root) / p) for p in r["images"]]), r["question"], *r["options"],
                    r["answer"], r["group"]])
    with common.atomic_write(out / "LMUData" / "MIA_TINY.tsv") as f:
        f.write(buf.getvalue())
    _write_tiny_lmms(out / "lmms", rows, image_root)
    return rows


def _write_tiny_lmms(folder, rows, image_root):
    import datasets

    feats = {"idx": datasets.Value("string"), "sub_task": datasets.Value("string"), "prompt": datasets.Value("string"),
             "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("string"),
             **{f"image_{j}": datasets.Image() for j in range(1, 5)}}
    cols = {k: [] for k in feats}
    for r in rows:
        opts = "".join(f"\n({'ABCD'[j]}) {o}" for j, o in enumerate(r["options"]))
        cols["idx"].append(r["id"])
        cols["sub_task"].append(r["group"])
        cols["prompt"].append(f"{r['question']}\nSelect from the following choices.{opts}")
        cols["choices"].append(r["options"])
        cols["answer"].append(f"({r['answer']})")
        for j in range(1, 5):
            p = r["images"][j - 1] if j <= len(r["images"]) else None
            cols[f"image_{j}"].append(None if p is None else str(Path(image_root) / p))
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))  # save_to_disk embeds the image bytes
    datasets.DatasetDict({"val": ds}).save_to_disk(str(folder))


# ---- plumbing ---------------------------------------------------------------------------------------------
def _first(it):
    return next((x for x in it if x is not None), None)


def _gpu_count():
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def _pythonpath():
    """The launcher imports common.py and vlm.py from here, whatever the harness's cwd."""
    return os.pathsep.join([str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def _dist_version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:  # noqa: BLE001 — provenance only: unknown is an honest answer
        return None


def _lmms_tasks_root():
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.origin:
        raise SystemExit("lmms-eval is not installed: pip install -r requirements-harness.txt, then "
                         "pip install --no-deps lmms-eval==0.7.3 (its own requirements pull a torchvision)")
    return Path(spec.origin).parent / "tasks"


def _run(cmd, cwd, env, log, dry_run):
    """Print the command; run it with its output shown and kept in `log` -> exit code (None: dry run)."""
    print("07_harness: " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    if dry_run:
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def targets(args):
    """-> (the benchmarks to run, VLMEvalKit's data folder): with --tiny, its own benchmark (built once
    in DIR) in this harness's format; else --benchmarks (default: the paper's columns this harness
    has) and --lmu-data."""
    if not args.tiny:
        return args.benchmarks or (PAPER_VLMEVALKIT if args.harness == "vlmevalkit" else PAPER_LMMS), args.lmu_data
    tiny = Path(args.tiny).resolve()
    if not (tiny / "mc.jsonl").is_file() or len((tiny / "mc.jsonl").read_text().splitlines()) != args.tiny_rows:
        write_tiny(tiny, args.toy_split, args.image_root, args.tiny_rows)
    benchmarks = ["custom:MIA_TINY"] if args.harness == "vlmevalkit" else [f"custom:MIA_TINY={tiny / 'lmms'}"]
    return benchmarks, str(tiny / "LMUData")


def main(args):
    t0 = time.time()
    models = {n: harness_models.full_checkpoint(p) for n, p in vlm.parse_models(args.model).items()}
    out = Path(args.out).resolve() / args.harness
    out.mkdir(parents=True, exist_ok=True)
    for n in models:  # our class rewrites these when it loads each model: none may be left from a run before
        (out / f"model-{n}.json").unlink(missing_ok=True)
    benchmarks, lmu_data = targets(args)
    if args.harness == "vlmevalkit":
        done = run_vlmevalkit(args, models, out, benchmarks, lmu_data)
    else:
        done = run_lmms(args, models, out, benchmarks)
    if done is None:  # dry run
        return None
    report = write_report(out, *done, models, args, benchmarks=benchmarks)
    print(f"07_harness: {len(report['benchmarks'])} benchmarks x {len(models)} models in {time.time() - t0:.0f} s "
          f"-> {out / 'report.json'}")
    if report["errors"]:
        raise SystemExit(f"07_harness: {len(report['errors'])} benchmark runs produced no score (listed above)")
    return report


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    h = p.add_argument_group("harness")
    x = h.add_mutually_exclusive_group(required=True)
    x.add_argument("--vlmevalkit", dest="harness", action="store_const", const="vlmevalkit",
                   help="run VLMEvalKit (not on PyPI: a clone, pip install -e, or --vlmevalkit-dir)")
    x.add_argument("--lmms-eval", dest="harness", action="store_const", const="lmms-eval",
                   help="run lmms-eval (requirements-harness.txt, then pip install --no-deps lmms-eval==0.7.3)")
    h.add_argument("--vlmevalkit-dir", help="your VLMEvalKit clone (default: where `vlmeval` is installed from)")
    h.add_argument("--judge", default="exact_matching", help="VLMEvalKit's judge: exact_matching, or an API model "
                   "(e.g. gpt-4o-mini; needs its key)")
    h.add_argument("--nproc", type=int, default=0, help="processes, one per GPU (0: the GPUs visible, at least 1)")
    h.add_argument("--allow-download", action="store_true", help="let the harness download missing benchmark data")
    h.add_argument("--dry-run", action="store_true", help="write the configs and print the commands only")
    d = p.add_argument_group("data")
    d.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model (repeat to compare): a full local checkpoint or a 06 output with OUT/final")
    d.add_argument("--benchmarks", nargs="+", default=None, help="default: the paper's columns this harness has "
                   "(VLMEvalKit: MMMU BLINK MVBench; lmms-eval: MMMU BLINK Mantis); see the docstring")
    d.add_argument("--lmu-data", default=os.environ.get("LMUData", str(Path.home() / "LMUData")),
                   help="VLMEvalKit's benchmark folder ($LMUData)")
    d.add_argument("--tiny", metavar="DIR", help="build (once) and run a small multi-image benchmark of toy images in "
                   "DIR, in the harness's own format, instead of --benchmarks")
    d.add_argument("--tiny-rows", type=int, default=6, help="--tiny: its number of rows")
    d.add_argument("--toy-split", default="data/toy/heldout.json", help="--tiny: the toy rows whose images it uses")
    d.add_argument("--image-root", default="data/toy/images", help="--tiny: their image folder")
    d.add_argument("--out", default="out/eval", help="output directory (the report goes to OUT/<harness>/)")
    d.add_argument("--paper-row", choices=sorted(PAPER), default="llava-1.5-7b", help="the paper's row shown beside")
    m = p.add_argument_group("model")
    m.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:1 ...")
    m.add_argument("--dtype", default="auto", choices=vlm.DTYPES, help="auto: bfloat16 on a GPU, the checkpoint's on a CPU")
    m.add_argument("--max-new-tokens", type=int, default=0, help="0: VLMEvalKit 2048 (its LLaVA class), lmms-eval each task's")
    return p.parse_args(argv)



if __name__ == "__main__":
    main(get_args())
