"""
07_eval.py — stage 7: score models on multi-image and single-image questions, side by side.
in : one or more local models + JSON/JSONL question files + image root
out: OUT/report.json (+ .meta.json), OUT/answers-<name>.jsonl (every answer, for reading)
  bash 07_eval.sh                      # toy: base vs DPO on the held-out benchmark (builds it first)
  python 07_eval.py --model base=models/toy-llava --model dpo=out/dpo-toy \\
      --data data/toy/heldout.json data/toy/eval-heldout/*.jsonl --scenes data/toy/heldout.json
  python 07_eval.py --model dpo=out/mia-dpo/final --data blink_mc.jsonl --image-root /data/blink
  bash 07_eval.sh --vlmevalkit | --lmms-eval ...   # the paper's benchmarks: 07_harness.py

Two kinds of rows, told apart per row:
- open questions in LLaVA format (`image`, `conversations`; 01-03's rows, the toy splits): the
  first turn is asked, the greedy answer is compared with the first answer after
  common.normalise_answer (the rule 04 and 05 use too: "The red." counts as "red").
- multiple choice `{id, images, question, options, answer}` (BLINK or Mantis converted
  offline): options are shown as `A. ...`, the letter is read back by `parse_choice`.
Groups: `single`, or `<format> <n_images>` from 01-03's `mia` record, or a multiple-choice row's
`group` field (default: its file's name).

Hallucination types (the paper's section 3.1), for rows whose images have known scenes (toy
rows, or any row once `--scenes` maps each image path to its attributes):
- sequence confusion: the answer is the asked attribute of ANOTHER image in the prompt;
- element interference: the answer is a different attribute of an image in the prompt
  (asked the shape's colour, answered a background colour);
- other: anything else (a colour in no image, an empty or malformed answer).
`random-image` is the accuracy of answering the asked attribute of a random image of the
prompt: the level a model that ignores the label sits at.

The paper's benchmarks run through VLMEvalKit or lmms-eval: 07_harness.py
(07_eval.sh --vlmevalkit / --lmms-eval).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import string
import time
from collections import defaultdict
from pathlib import Path

import common
from common import normalise_answer  # one rule for "the same answer" in 04, 05 and 07

# ---- method: scoring (edit me) --------------------------------------------------------------
def parse_choice(answer, options):
    """The option letter a free-text answer picks, or None.

    Accepted, in this order: a letter alone or marked at the start ("B", "(b)", "B." or "b) dog"), the
    text of exactly one option ("dog"), a lone letter anywhere ("The answer is B.").
    parse_choice("(b) a dog", ["cat", "dog"]) -> "B";  parse_choice("dog", ["cat", "dog"]) -> "B"."""
    letters = string.ascii_uppercase[: len(options)]
    a = str(answer).strip()
    # subtle: "A dog" starts with the article, not option A: a leading letter counts only when
    # alone or marked ("B", "(b)", "B.", "b) dog"); the text then decides.
    m = re.match(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[).:]|$))", a)
    if m and (m.group(1) or m.group(2)).upper() in letters:
        return (m.group(1) or m.group(2)).upper()
    hits = [letters[i] for i, o in enumerate(options) if normalise_answer(o) and normalise_answer(o) == normalise_answer(a)]
    if len(hits) == 1:
        return hits[0]
    alone = set(re.findall(rf"\b([{letters}])\b", a))
    return alone.pop() if len(alone) == 1 else None


def mc_prompt(question, n_images, options):
    """A multiple-choice question in VLMEvalKit's wording for LLaVA. Images go first, one
    `<image>` each, unless the question already places them."""
    head = "" if common.MARKER in question else "<image>\n" * n_images
    opts = "".join(f"\n{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))
    return f"{head}{question}{opts}\nAnswer with the option's letter from the given choices directly."


def hallucination_type(answer, scenes, target, attr):
    """Classify a WRONG answer. scenes: one dict of attributes per image in the prompt (toy:
    shape, color, background); target: 0-based index of the image asked about; attr: the
    attribute asked. -> "sequence confusion" | "element interference" | "other".

    scenes=[{color: red, background: gray}, {color: blue, background: white}], target=0, attr=color:
    "blue" -> sequence confusion, "gray" -> element interference, "green" -> other."""
    a = normalise_answer(answer)
    if any(normalise_answer(s[attr]) == a for j, s in enumerate(scenes) if j != target):
        return "sequence confusion"
    if any(normalise_answer(v) == a for s in scenes for k, v in s.items() if k != attr):
        return "element interference"
    return "other"


def summarise(records):
    """Per-group accuracy and error breakdown from answer records -> {group: {...}}, plus
    `multi-image` (all groups but `single`, pooled)."""
    by = defaultdict(list)
    for r in records:
        by[r["group"]].append(r)
        if r["group"] != "single":
            by["multi-image"].append(r)
    out = {}
    for g, rs in by.items():
        n, right = len(rs), sum(r["correct"] for r in rs)
        s = {"n": n, "accuracy": right / n}
        typed = [r for r in rs if "type" in r]  # every scored toy row: right ones have type None
        if typed:
            wrong = [r for r in typed if not r["correct"]]
            s["errors"] = {t: sum(r["type"] == t for r in wrong)
                           for t in ("sequence confusion", "element interference", "other")}
            s["random_image_accuracy"] = sum(r["random_image"] for r in typed) / len(typed)
        out[g] = s
    return dict(sorted(out.items(), key=lambda kv: _group_order(kv[0])))


def _group_order(g):
    head, _, n = g.rpartition(" ")
    rank = {"single": 0, "sequence": 1, "grid": 2, "pip": 3, "multi-image": 9}
    return (rank.get(head or g, 5), head or g, int(n) if n.isdigit() else 0)


# ---- questions from rows ----------------------------------------------------------------------
TARGET = re.compile(r"\bIn\s+Image\s*(\d+)\s*,", re.I)


def row_question(row, path, line, scene_of):
    """One scored question from a row -> dict, or raises DataError naming the field."""
    if "options" in row:  # multiple choice
        for f in ("id", "images", "question", "options", "answer"):
            if f not in row:
                raise common.DataError(path, line, f, "missing (multiple-choice rows need id, images, question, options, answer)")
        opts, ans = row["options"], row["answer"]
        if isinstance(opts, dict):  # {"A": "...", "B": "..."}
            opts = [opts[k] for k in sorted(opts)]
        if not isinstance(opts, list) or len(opts) < 2 or len(opts) > 26:
            raise common.DataError(path, line, "options", "must be a list (or A-Z dict) of 2-26 options")
        letters = string.ascii_uppercase[: len(opts)]
        gold = str(ans).strip().upper() if str(ans).strip().upper() in letters else parse_choice(ans, opts)
        if gold is None:
            raise common.DataError(path, line, "answer", f"{ans!r} is neither an option letter nor an option's text")
        images = row["images"] if isinstance(row["images"], list) else [row["images"]]
        return {"id": str(row["id"]), "kind": "mc", "images": images, "options": opts, "gold": gold,
                "question": mc_prompt(row["question"], len(images), opts),
                "group": row.get("group") or Path(path).name.split(".")[0]}
    images = common.check_llava_row(row, path, line)
    conv = row["conversations"]
    mia = row.get("mia") or {}
    group = f"{mia['format']} {mia['n_images']}" if mia else ("single" if len(images) == 1 else f"multi {len(images)}")
    q = {"id": str(row["id"]), "kind": "open", "images": images, "question": conv[0]["value"],
         "gold": conv[1]["value"], "group": group}
    # scenes of the images the question is about (for the hallucination breakdown)
    if mia.get("format") == "grid":
        parts = mia.get("cell_images") or []
    elif mia.get("format") == "pip":
        parts = (mia.get("source_images") or [])[:1] + (mia.get("companions") or [])[:1]
    else:
        parts = images
    scenes = [scene_of.get(p) for p in parts]
    if scenes and all(scenes):
        target = 0  # one image, or pic-in-pic's inset (listed first)
        if len(scenes) > 1 and mia.get("format") != "pip":
            m = TARGET.search(q["question"])  # "In Image3, ..." names it; a merged grid's later turns differ
            target = int(m.group(1)) - 1 if m else int(mia.get("target", 1)) - 1
        if 0 <= target < len(scenes):
            attr = next((k for k, v in scenes[target].items() if normalise_answer(v) == normalise_answer(q["gold"])), None)
            if attr is not None:
                q.update(scenes=scenes, target=target, attr=attr)
    return q


def load_questions(files, scene_files, on_error, skips):
    """-> list of questions (first turn of each row), in file order; ids made unique per file."""
    scene_of = {}
    for sf in scene_files:
        for _, r in common.read_rows(sf):
            if isinstance(r.get("toy"), dict) and isinstance(r.get("image"), str):
                scene_of[r["image"]] = r["toy"]
    out, seen = [], set()
    for f in files:
        for line, row in common.read_rows(f, on_error=on_error, skips=skips):
            try:
                q = row_question(row, f, line, scene_of)
            except common.DataError as e:
                if on_error == "raise":
                    raise
                skips.add(row.get("id") if isinstance(row, dict) else None, f"{e.field}: {e.msg}", f, line)
                continue
            q["key"] = f"{Path(f).name}:{q['id']}"
            if q["key"] in seen:  # answers are matched to questions by id: it must be unique
                err = common.DataError(f, line, "id", f"{q['id']!r} repeats an earlier row's id")
                if on_error == "raise":
                    raise err
                skips.add(q["id"], f"id: {err.msg}", f, line)
                continue
            seen.add(q["key"])
            out.append(q)
    return out


def score(q, answer):
    """One answer record: correct or not, and for a wrong toy answer its hallucination type."""
    r = {"key": q["key"], "id": q["id"], "group": q["group"], "gold": q["gold"], "answer": answer}
    if q["kind"] == "mc":
        r["choice"] = parse_choice(answer, q["options"])
        r["correct"] = r["choice"] == q["gold"]
        return r
    r["correct"] = normalise_answer(answer) == normalise_answer(q["gold"])
    if "scenes" in q:
        sc, t, a = q["scenes"], q["target"], q["attr"]
        r["type"] = None if r["correct"] else hallucination_type(answer, sc, t, a)
        r["random_image"] = sum(normalise_answer(s[a]) == normalise_answer(q["gold"]) for s in sc) / len(sc)
    return r


# ---- plumbing ---------------------------------------------------------------------------------
def resolve_model(path):
    """A model directory, or 06's OUT: OUT/final (merged or full) if there, else OUT/adapter on the
    base model its adapter_config names. -> (model dir, adapter dir or None)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p, None
    if (p / "final" / "config.json").is_file():
        return p / "final", None
    cfg = p / "adapter" / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text())["base_model_name_or_path"]
        return Path(base), p / "adapter"
    raise FileNotFoundError(f"{path}: no config.json, final/ or adapter/ here: not a model directory or a 06 output")


def parse_models(specs):
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model {s!r}: expected NAME=PATH (e.g. base=models/toy-llava)")
        if name in out:
            raise SystemExit(f"--model: the name {name!r} is given twice")
        out[name] = path
    return out


def answer_all(name, path, model, proc, questions, args):
    """Greedy answers of one model -> records. Finished batches go to OUT/answers-<name>.jsonl.partial
    (flushed per batch), so a stopped run resumes; a partial from another model or data is refused."""
    config = {"model": str(path), "fingerprint": common.model_fingerprint(model), "max_new_tokens": args.max_new_tokens,
              "questions": hashlib.sha256("\n".join(q["key"] + "\t" + q["question"] for q in questions).encode()).hexdigest()[:16]}
    final = Path(args.out) / f"answers-{name}.jsonl"
    partial = common.ResumeFile(str(final) + ".partial", config, key="key")
    if partial.done:
        print(f"[{name}] resuming: {len(partial.done)} of {len(questions)} answers already in {partial.path}")
    todo = [q for q in questions if q["key"] not in partial.done]
    todo.sort(key=lambda q: (len(q["images"]), len(q["question"])))  # similar lengths batch together
    with common.Progress(len(questions), f"07 {name}", unit="answer", initial=len(partial.done)) as bar:
        for i in range(0, len(todo), args.batch_size):
            qs = todo[i : i + args.batch_size]
            ims = [[common.load_image(args.image_root, p) for p in q["images"]] for q in qs]
            answers = common.generate(model, proc, [q["question"] for q in qs], ims, max_new_tokens=args.max_new_tokens)
            partial.add([score(q, a) for q, a in zip(qs, answers)])
            bar.update(len(qs))
    done = partial.done
    records = [done[q["key"]] for q in questions]
    common.write_jsonl(final, records)
    partial.remove()
    return records, config


def mistake_pairs(questions, records):
    """Held-out preference pairs from one model's mistakes: chosen = the ground truth, rejected =
    that model's wrong greedy answer (open questions with a non-empty answer)."""
    qs = {q["key"]: q for q in questions}
    return [{"key": r["key"], "group": r["group"], "question": qs[r["key"]]["question"], "images": qs[r["key"]]["images"],
             "chosen": qs[r["key"]]["gold"], "rejected": r["answer"]}
            for r in records if qs[r["key"]]["kind"] == "open" and not r["correct"] and r["answer"].strip()]


def pair_logps(model, proc, pairs, args):
    """Summed response log-probs (incl. EOS) of chosen and rejected, as 06 scores them -> two lists."""
    chosen, rejected = [], []
    for i in range(0, len(pairs), args.batch_size):
        ps = pairs[i : i + args.batch_size]
        ims = [[common.load_image(args.image_root, p) for p in x["images"]] for x in ps]
        c, r = common.pair_logps(model, proc, [x["question"] for x in ps], ims, [x["chosen"] for x in ps],
                                 [x["rejected"] for x in ps])
        chosen, rejected = chosen + c, rejected + r
    return chosen, rejected


def pair_summary(pairs, chosen, rejected, ref=None):
    """Preference accuracy (logp chosen > logp rejected) and mean log-probs; against a reference
    model's log-probs also the mean change of each and the DPO reward accuracy
    ((chosen - ref) > (rejected - ref)), per format and over all pairs."""
    by = defaultdict(list)
    for i, x in enumerate(pairs):
        by[x["group"].rpartition(" ")[0] or x["group"]].append(i)
        by["all"].append(i)
    out = {}
    for g, idx in by.items():
        s = {"n": len(idx), "preference_accuracy": sum(chosen[i] > rejected[i] for i in idx) / len(idx),
             "mean_logp_chosen": sum(chosen[i] for i in idx) / len(idx),
             "mean_logp_rejected": sum(rejected[i] for i in idx) / len(idx)}
        if ref is not None:
            rc, rr = ref
            s["chosen_change"] = sum(chosen[i] - rc[i] for i in idx) / len(idx)
            s["rejected_change"] = sum(rejected[i] - rr[i] for i in idx) / len(idx)
            s["reward_accuracy"] = sum(chosen[i] - rc[i] > rejected[i] - rr[i] for i in idx) / len(idx)
        out[g] = s
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "all", _group_order(kv[0]))))


def table(report, names):
    """The side-by-side text table: accuracy per group for each model, then the errors by type."""
    groups = list(next(iter(report.values()))["groups"])
    lines = [f"{'group':<16}{'n':>6}" + "".join(f"{n:>10}" for n in names)
             + (f"{'change':>9}" if len(names) == 2 else "") + f"{'random-image':>14}"]
    for g in groups:
        accs = [report[n]["groups"][g]["accuracy"] for n in names]
        first = report[names[0]]["groups"][g]
        row = f"{g:<16}{first['n']:>6}" + "".join(f"{100 * a:>10.1f}" for a in accs)
        if len(names) == 2:
            row += f"{100 * (accs[1] - accs[0]):>+9.1f}"
        row += f"{100 * first['random_image_accuracy']:>14.1f}" if "random_image_accuracy" in first else ""
        lines.append(row)
    typed = [g for g in groups if "errors" in report[names[0]]["groups"][g]]
    if typed:
        lines += ["", "wrong answers by type (sequence confusion / element interference / other):"]
        for g in typed:
            cells = ["{sequence confusion}/{element interference}/{other}".format(**report[n]["groups"][g]["errors"]) for n in names]
            lines.append(f"{g:<16}" + "".join(f"{c:>16}" for c in cells))
    if all("pairs" in report[n] for n in names):
        first = names[0]
        w = {n: max(12, len(n) + 7) for n in names}  # column widths that fit "pref <name>"
        lines += ["", f"held-out pairs from {first}'s mistakes (chosen = truth, rejected = its answer):",
                  f"{'format':<16}{'n':>6}" + "".join(f"{'pref ' + n:>{w[n]}}" for n in names)
                  + "".join(f"{'chosen ' + n:>{w[n] + 2}}{'rejected':>10}{'reward acc':>12}" for n in names[1:])]
        for g, s0 in report[first]["pairs"].items():
            row = f"{g:<16}{s0['n']:>6}" + "".join(f"{100 * report[n]['pairs'][g]['preference_accuracy']:>{w[n]}.1f}" for n in names)
            for n in names[1:]:
                s = report[n]["pairs"][g]
                row += f"{s['chosen_change']:>+{w[n] + 2}.2f}{s['rejected_change']:>+10.2f}{100 * s['reward_accuracy']:>12.1f}"
            lines.append(row)
        lines.append("(pref: % of pairs where the model gives the truth a higher log-prob; chosen / rejected: mean "
                     f"change of the log-prob against {first}; reward acc: % where chosen rose more than rejected)")
    return "\n".join(lines)


def main(args):
    t0 = time.time()
    common.set_threads(args.threads)
    models = parse_models(args.model)
    if not args.data:
        raise SystemExit("--data: give at least one question file (07_eval.sh builds the toy benchmark)")
    skips = common.Skips()
    questions = load_questions(args.data, args.scenes, args.on_error, skips)
    if args.limit:
        questions = questions[: args.limit]
    if not questions:
        raise SystemExit(f"no questions in {args.data}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report, configs, pairs, ref = {}, {}, None, None
    for name, path in models.items():
        t = time.time()
        model_dir, adapter = resolve_model(path)
        model, proc = common.load_model(model_dir, dtype=args.dtype, device=args.device, adapter=adapter,
                                        max_image_tokens=args.max_image_tokens)
        records, configs[name] = answer_all(name, path, model, proc, questions, args)
        report[name] = {"model": str(path), "groups": summarise(records)}
        if args.pairs:
            if pairs is None:  # the first model's mistakes, scored by every model
                pairs = mistake_pairs(questions, records)
            if pairs:
                lp = pair_logps(model, proc, pairs, args)
                report[name]["pairs"] = pair_summary(pairs, *lp, ref=ref)
                ref = ref or lp
        report[name]["seconds"] = round(time.time() - t, 1)
    text = table(report, list(models))
    print(text)
    out = Path(args.out) / "report.json"
    with common.atomic_write(out) as f:
        json.dump(report, f, indent=1)
    with common.atomic_write(Path(args.out) / "report.txt") as f:
        f.write(text + "\n")
    common.write_sidecar(out, args, counts={"questions": len(questions), "skipped": len(skips)}, skips=skips, models=configs)
    if len(skips):
        print(f"skipped {len(skips)} rows: {skips.summary()}")
    print(f"07: {len(questions)} questions x {len(models)} models in {time.time() - t0:.0f} s -> {out}")
    return report


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model to score (repeat to compare): a local model directory or a 06 output directory")
    g.add_argument("--data", nargs="+", default=[], help="question files: LLaVA-format rows and/or multiple-choice rows")
    g.add_argument("--image-root", default="data/toy/images", help="folder the rows' image paths are relative to")
    g.add_argument("--scenes", nargs="*", default=[], help="rows with `image` + `toy` attributes (the toy splits): "
                   "enables the hallucination breakdown")
    g.add_argument("--out", default="out/eval", help="output directory")
    g.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad rows: stop naming file:line, or count and skip")
    m = p.add_argument_group("method")
    m.add_argument("--max-new-tokens", type=int, default=16)
    m.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="also score held-out preference pairs made from the first model's mistakes")
    s = p.add_argument_group("system")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--dtype", default="auto", choices=common.DTYPES)
    s.add_argument("--device", default="cpu")
    common.add_max_image_tokens_flag(s)
    common.add_threads_flag(s)
    args = p.parse_args(argv)
    if not args.model:
        args.model = ["base=models/toy-llava", "dpo=out/dpo-toy"]
    return args


if __name__ == "__main__":
    common.run_stage(main, get_args)
