"""
07_eval.py — stage 7: score models on multi-image and single-image questions, side by side.
in : one or more local models + JSON/JSONL question files + image root
out: OUT/report.json (+ .meta.json), OUT/answers-<name>.jsonl (every answer, for reading),
     OUT/mass-<name>.jsonl (where each question's probability at the answer goes)
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
  offline, NLVR2 by convert_nlvr2.py): asked as common.mc_prompt (options as `A. ...`), the
  letter is read back by `parse_choice`.
Groups: `single`, or `<format> <n_images>` from 01-03's `mia` record, or a multiple-choice row's
`group` field (default: its file's name).

Hallucination types (the paper's section 3.1), for rows whose images have known scenes (toy
rows, or any row once `--scenes` maps each image path to its attributes):
- sequence confusion: the answer is the asked attribute of ANOTHER image in the prompt;
- element interference: the answer is a different attribute of an image in the prompt
  (asked the shape's colour, answered a background colour);
- other: anything else (a colour in no image, an empty or malformed answer).
An answer naming several attributes ("a red shape on gray", read against the gold's wording) is
element interference when each attribute is right for SOME image of the prompt but they come from
different images or sit in another attribute's slot, sequence confusion when all describe one other
image (hallucination_type_multi). The toy world has no such answers yet.

Where the probability goes (`--mass`, on by default; toy rows with one-word answers): for each
model and question, ONE teacher-forced forward on the prompt the model answers from gives the
next-token distribution at the first answer position (LM head at that position only), normalised
over the full vocabulary. It is split into the truth, the asked attribute of the prompt's OTHER
images (sequence-confusion mass), the prompt's other attribute values among the answer words
(element-interference mass: background colours when asked the shape's colour), answer words in
no image, and the rest (mass_split); `vocab` is the mass on all answer words. The answer words are
every value the asked attributes take in the --scenes files. In the committed toy world each one
is ONE token, so this is each answer's exact probability of being the answer's first word; a word
of several tokens costs one more forward per question, with its exact probability as the product
over its tokens (non-canonical tokenizations of the same word are not counted); words whose tokens
begin each other's are an error. `rejected`: held-out rows have no pairs file, so it is the FIRST
model's wrong greedy answer (the same answers as the held-out pairs below), on the questions where
that answer is an answer word. Per question in OUT/mass-<name>.jsonl, per group in report.json.
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
import vlm
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


def answer_attributes(answer, gold, target_scene, attrs, scenes, vocab=()):
    """The attributes a multi-attribute answer names -> list of (value, slots): each attribute word
    of the answer and the attribute slot(s) it fills.

    The gold answer is the template: its words that are the target's values of `attrs` are the
    slots ("a red shape on gray" -> "a {color} shape on {background}"). An answer with the same
    words around the slots is read slot by slot. Any other answer is read word by word: a word
    that is an attribute value of some image in the prompt fills every slot that value has there;
    a word of `vocab` (the world's attribute words) in no image fills no slot.
    answer_attributes("a gray shape on red", "a red shape on gray", {color: red, background: gray},
    ["color", "background"], scenes) -> [("gray", {"color"}), ("red", {"background"})]."""
    words, gold_words = normalise_answer(answer).split(), normalise_answer(gold).split()
    slot_of = {normalise_answer(target_scene[k]): k for k in attrs}
    template = [slot_of.get(w) for w in gold_words]
    if len(words) == len(gold_words) and all(t is not None or w == g for w, g, t in zip(words, gold_words, template)):
        return [(w, {t}) for w, t in zip(words, template) if t is not None]
    vocab = {normalise_answer(v) for v in vocab}
    out = []
    for w in words:
        slots = {k for s in scenes for k, v in s.items() if normalise_answer(v) == w}
        if slots or w in vocab:
            out.append((w, slots))
    return out


def hallucination_type_multi(mentions, scenes, target):
    """Classify a WRONG answer that names several attributes, given as answer_attributes' mentions
    [(value, slots), ...]. -> "sequence confusion" | "element interference" | "other".

    - sequence confusion: every mention fits ONE other image, each in its slot;
    - element interference: every mention is an attribute of SOME image of the prompt, but they
      come from different images or sit in another attribute's slot;
    - other: a word in no image, no attribute named, or only the target's own attributes (an
      incomplete answer, not a mix).
    scenes=[{color: red, background: gray}, {color: blue, background: white}], target=0:
    "a blue shape on white" -> sequence confusion; "a blue shape on gray" (Image2's shape, Image1's
    background) and "a gray shape on red" (slots swapped) -> element interference;
    "a green shape on gray" -> other. One mention in the asked slot gives hallucination_type's answer."""
    if not mentions:
        return "other"

    def fits(s):
        return all(any(k in s and normalise_answer(s[k]) == v for k in slots) for v, slots in mentions)

    if any(fits(s) for j, s in enumerate(scenes) if j != target):
        return "sequence confusion"
    if fits(scenes[target]):
        return "other"
    values = {normalise_answer(v) for s in scenes for v in s.values()}
    return "element interference" if all(v in values for v, _ in mentions) else "other"


def mass_split(word_probs, scenes, target, attr, vocab, rejected=None, total=1.0):
    """Where a model's probability of the answer sits, for one question.

    word_probs : answer word -> the probability that the model's answer starts with it (for a
                 one-token word: its mass at the first answer position), for every word of `vocab`
    scenes / target / attr : as in hallucination_type
    vocab      : the answer words of the world (every value the asked attributes take)
    total      : the whole distribution's mass (1 up to rounding): `rest` is what the words leave
    -> {truth, other_images, other_attributes, no_image, rest, vocab[, rejected]}. The first five
    partition the distribution: truth = the target's value of `attr`; other_images = the other
    images' values of `attr`, the truth's word excluded (sequence-confusion mass); other_attributes
    = the prompt's other attribute values that are answer words, not counted before (element-
    interference mass: background colours when asked the shape's colour); no_image = answer words
    in no image of the prompt; rest = everything else. vocab = the mass on all answer words;
    rejected = the mass on the rejected answer (an answer word; it also sits in one of the five).
    Worked example: red .5, blue .2, gray .1, white .05, green .05 (rest .1); scenes
    [{color: red, background: gray}, {color: blue, background: white}], target 0, attr color ->
    truth .5, other_images .2, other_attributes .15, no_image .05, rest .1, vocab .9."""
    def words(vs):
        return {normalise_answer(v) for v in vs} & set(word_probs)

    truth = words([scenes[target][attr]])
    others = words(s[attr] for j, s in enumerate(scenes) if j != target) - truth
    attrs = words(v for s in scenes for k, v in s.items() if k != attr) - truth - others
    none = words(vocab) - truth - others - attrs
    out = {k: float(sum(word_probs[w] for w in ws)) for k, ws in
           (("truth", truth), ("other_images", others), ("other_attributes", attrs), ("no_image", none))}
    out["rest"] = float(total) - sum(out.values())  # the four word sets are disjoint: rest is the complement
    out["vocab"] = float(sum(word_probs[w] for w in words(vocab)))
    if rejected is not None:
        out["rejected"] = float(word_probs[normalise_answer(rejected)])
    return out


MASS_KEYS = ("truth", "other_images", "other_attributes", "no_image", "rest", "vocab")


def mass_summary(records):
    """Mean mass per group (as summarise's groups, plus each format pooled when it has several
    sizes, and `multi-image`) from per-question mass records -> {group: {n, <MASS_KEYS>, rejected,
    n_rejected}}; `rejected` is the mean over the questions that have one."""
    by = defaultdict(list)
    for r in records:
        by[r["group"]].append(r)
        if r["group"] != "single":
            by["multi-image"].append(r)
    for g in [g for g in by if g not in ("single", "multi-image")]:
        head = g.rpartition(" ")[0]
        if head and sum(k.rpartition(" ")[0] == head for k in by) > 1:
            by[head] += by[g]
    out = {}
    for g, rs in by.items():
        s = {"n": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in MASS_KEYS}}
        rej = [r["rejected"] for r in rs if r.get("rejected") is not None]
        s["n_rejected"], s["rejected"] = len(rej), (sum(rej) / len(rej) if rej else None)
        out[g] = s

    def order(g):  # a pooled format right after its sizes
        if g.rpartition(" ")[2].isdigit() or g in ("single", "multi-image"):
            return _group_order(g)
        return _group_order(g + " 0")[:2] + (99,)

    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


ERROR_TYPES = ("sequence confusion", "element interference", "other")


def summarise(records):
    """Per-group accuracy and error breakdown from answer records -> {group: {...}}, plus
    `multi-image` (all groups but `single`, pooled). A group with several-attribute answers also
    has `by_answer`: accuracy and errors of its one-word and its several-attribute questions apart."""
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
            s["errors"] = {t: sum(r["type"] == t for r in wrong) for t in ERROR_TYPES}
            s["random_image_accuracy"] = sum(r["random_image"] for r in typed) / len(typed)
        kinds = {r.get("answer_kind") for r in typed}
        if "attributes" in kinds:  # one-word and several-attribute answers, each on its own
            s["by_answer"] = {k: {"n": len(rk), "accuracy": sum(r["correct"] for r in rk) / len(rk),
                                  "errors": {t: sum(r["type"] == t for r in rk) for t in ERROR_TYPES}}
                              for k in ("one word", "attributes") if (rk := [r for r in typed if r.get("answer_kind") == k])}
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
                "question": common.mc_prompt(row["question"], len(images), opts),
                "group": row.get("group") or Path(path).name.split(".")[0]}
    images = common.check_llava_row(row, path, line)
    conv = row["conversations"]
    mia = row.get("mia") or {}
    group = f"{mia['format']} {mia['n_images']}" if mia else ("single" if len(images) == 1 else f"multi {len(images)}")
    if len(conv) < 2 or not str(conv[1].get("value", "")).strip():  # nothing to score an answer against
        raise common.DataError(path, line, "conversations[1].value", "empty gold answer")
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
            gold = normalise_answer(q["gold"])
            attr = next((k for k, v in scenes[target].items() if normalise_answer(v) == gold), None)
            if attr is not None:
                q.update(scenes=scenes, target=target, attr=attr)
            else:  # an answer naming several of the target's attributes ("a red shape on gray")
                words = gold.split()
                attrs = sorted((k for k, v in scenes[target].items() if normalise_answer(v) in words),
                               key=lambda k: words.index(normalise_answer(scenes[target][k])))
                if len(attrs) > 1:
                    q.update(scenes=scenes, target=target, attrs=attrs)
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
    words = sorted({v for s in scene_of.values() for v in s.values() if isinstance(v, str)})
    for q in out:
        if "attrs" in q:  # the world's attribute words: a multi-attribute answer's words in no image count
            q["vocab"] = words
    return out


def score(q, answer):
    """One answer record: correct or not, and for a wrong toy answer its hallucination type."""
    r = {"key": q["key"], "id": q["id"], "group": q["group"], "gold": q["gold"], "answer": answer}
    if q["kind"] == "mc":
        r["choice"] = parse_choice(answer, q["options"])
        r["correct"] = r["choice"] == q["gold"]
        return r
    r["correct"] = normalise_answer(answer) == normalise_answer(q["gold"])
    if "attr" in q:
        sc, t, a = q["scenes"], q["target"], q["attr"]
        r["type"], r["answer_kind"] = None if r["correct"] else hallucination_type(answer, sc, t, a), "one word"
        r["random_image"] = sum(normalise_answer(s[a]) == normalise_answer(q["gold"]) for s in sc) / len(sc)
    elif "attrs" in q:  # several attributes in one answer
        sc, t, attrs = q["scenes"], q["target"], q["attrs"]
        mentions = answer_attributes(answer, q["gold"], sc[t], attrs, sc, q.get("vocab", ()))
        r["type"], r["answer_kind"] = None if r["correct"] else hallucination_type_multi(mentions, sc, t), "attributes"
        r["random_image"] = sum(all(normalise_answer(s[k]) == normalise_answer(sc[t][k]) for k in attrs) for s in sc) / len(sc)
    return r


# ---- plumbing ---------------------------------------------------------------------------------
def answer_all(name, path, model, proc, questions, args):
    """Greedy answers of one model -> records. Finished batches go to OUT/answers-<name>.jsonl.partial
    (flushed per batch), so a stopped run resumes; a partial from another model or data is refused."""
    config = {"model": str(path), "fingerprint": vlm.model_fingerprint(model), "max_new_tokens": args.max_new_tokens,
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
            answers = vlm.generate(model, proc, [q["question"] for q in qs], ims, max_new_tokens=args.max_new_tokens)
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
        c, r = vlm.pair_logps(model, proc, [x["question"] for x in ps], ims, [x["chosen"] for x in ps],
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


def answer_vocab(questions):
    """The answer words of the scored toy questions: every value their asked attributes take in
    the known scenes -> sorted list (empty when no question has scenes)."""
    asked = {q["attr"] for q in questions if "attr" in q}
    return sorted({normalise_answer(s[k]) for q in questions if "attr" in q for s in q["scenes"] for k in asked if k in s})


def answer_token_ids(processor, question, words):
    """Each answer word -> its tokens as the template and tokenizer place them after the prompt
    (build_inputs' split, no EOS) -> {word: [ids]}. The words' answer events must be disjoint, so a
    word whose tokens begin another word's (or equal them) is an error naming both."""
    tok = processor.tokenizer
    prompt = vlm.render_prompt(processor, question)
    special = not (tok.bos_token and prompt.startswith(tok.bos_token))
    p_ids = tok(prompt, add_special_tokens=special)["input_ids"]
    out = {}
    for w in words:
        _, response = vlm.render_pair(processor, question, w)
        f_ids = tok(prompt + response, add_special_tokens=special)["input_ids"]
        if f_ids[: len(p_ids)] != p_ids or len(f_ids) == len(p_ids):
            raise SystemExit(f"--mass: the answer word {w!r} changes the prompt's tokens or has none (run with --no-mass)")
        out[w] = f_ids[len(p_ids):]
    for a in out:
        for b in out:
            if a != b and out[b][: len(out[a])] == out[a]:
                raise SystemExit(f"--mass: the tokens of {a!r} {out[a]} begin those of {b!r} {out[b]}: their answers "
                                 f"overlap and the split is not a partition (run with --no-mass)")
    return out


def answer_mass(name, model, proc, questions, token_ids, vocab, rejected_of, args):
    """mass_split for every question -> records {key, group, <mass>}.

    ONE teacher-forced forward per question on the prompt the model answers from (build_inputs with
    the truth as the answer), the LM head applied only at the last prompt position, which predicts
    the first answer token: that gives every one-token word's probability. A word of several tokens
    (none in the committed toy world; the tiny test world has some) needs its own forward per
    question: its exact probability is the product over its tokens (response_logps, no EOS)."""
    import torch

    single = {w: ids[0] for w, ids in token_ids.items() if len(ids) == 1}
    multi = [w for w, ids in token_ids.items() if len(ids) > 1]
    out = []
    todo = sorted(questions, key=lambda q: (len(q["images"]), len(q["question"])))
    with common.Progress(len(todo), f"07 {name} mass", unit="question") as bar:
        for i in range(0, len(todo), args.batch_size):
            qs = todo[i : i + args.batch_size]
            texts = [q["question"] for q in qs]
            ims = [[common.load_image(args.image_root, p) for p in q["images"]] for q in qs]
            batch = vlm.to_model(vlm.build_inputs(proc, texts, ims, answers=[q["gold"] for q in qs]), model)
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_lens")}
            with torch.no_grad():
                hidden = vlm.last_hidden_state(model, {**inputs, "use_cache": False})  # (B, T, H)
                # right padding: the prompt of row b ends at prompt_lens[b] - 1
                at = hidden[torch.arange(len(qs), device=hidden.device), batch["prompt_lens"] - 1]  # (B, H)
                probs = vlm.next_token_logprobs(model, at).double().exp().cpu()  # (B, V)
                seq = {w: vlm.response_logps(model, vlm.to_model(vlm.build_inputs(
                           proc, texts, ims, answers=[w] * len(qs), add_eos=False), model))[0].double().exp().cpu()
                       for w in multi}  # w -> (B,)
            for b, q in enumerate(qs):
                word_probs = {**{w: float(probs[b, t]) for w, t in single.items()}, **{w: float(seq[w][b]) for w in multi}}
                m = mass_split(word_probs, q["scenes"], q["target"], q["attr"], vocab,
                               rejected=rejected_of.get(q["key"]), total=float(probs[b].sum()))
                out.append({"key": q["key"], "group": q["group"], **m})
            bar.update(len(qs))
    order = {q["key"]: i for i, q in enumerate(questions)}
    return sorted(out, key=lambda r: order[r["key"]])


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
    split = [g for g in groups if "attributes" in report[names[0]]["groups"][g].get("by_answer", {})]
    if split:
        lines += ["", "one-word answers vs describe answers (\"a red shape on gray\"): accuracy (n) and the describe "
                  "answers' errors (sequence confusion / element interference / other):"]
        for g in split:
            cells = []
            for n in names:
                b = report[n]["groups"][g]["by_answer"]
                one, att = b.get("one word", {"n": 0, "accuracy": float("nan")}), b["attributes"]
                cells.append(f"{100 * one['accuracy']:.1f} | {100 * att['accuracy']:.1f} ({att['n']}) "
                             + "{sequence confusion}/{element interference}/{other}".format(**att["errors"]))
            lines.append(f"{g:<16}" + "".join(f"{c:>30}" for c in cells))
    if all("mass" in report[n] for n in names):
        lines += ["", mass_table(report, names)]
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


def mass_table(report, names):
    """Where each model's probability at the first answer token sits, per group (% of the full
    next-token distribution, mean over questions)."""
    w = max(7, max(len(n) for n in names) + 2)
    cols = ("truth", "other_images", "other_attributes", "no_image", "rest", "vocab")
    heads = ("truth", "other img", "other attr", "no image", "rest", "vocab", "rejected")
    lines = ["probability mass at the first answer token (%, mean over questions):",
             f"{'group':<16}{'model':<{w}}{'n':>6}" + "".join(f"{h:>11}" for h in heads) + f"{'n rej':>7}"]
    for g in report[names[0]]["mass"]:
        for i, n in enumerate(names):
            s = report[n]["mass"][g]
            rej = "-" if s["rejected"] is None else f"{100 * s['rejected']:.1f}"
            lines.append(f"{g if i == 0 else '':<16}{n:<{w}}{s['n']:>6}" + "".join(f"{100 * s[c]:>11.1f}" for c in cols)
                         + f"{rej:>11}{s['n_rejected']:>7}")
    lines.append("(truth: the asked attribute of the asked image; other img: that attribute of the prompt's other images "
                 "(sequence confusion); other attr: the prompt's other attribute values among the answer words (element "
                 "interference); no image: answer words in no image of the prompt; rest: every other token — these five "
                 f"sum to 100. vocab: all answer words; rejected: {names[0]}'s wrong answer, on the n rej questions it got "
                 "wrong with an answer word)")
    return "\n".join(lines)


def read_questions(args, skips):
    """--data (+ --scenes, --limit, --on-error) -> the questions; SystemExit when there are none."""
    if not args.data:
        raise SystemExit("--data: give at least one question file (07_eval.sh builds the toy benchmark)")
    questions = load_questions(args.data, args.scenes, args.on_error, skips)
    if args.limit:
        questions = questions[: args.limit]
    questions = usable_images(questions, args.image_root, args.on_error, skips)
    if not questions:
        raise SystemExit(f"no questions in {args.data}")
    return questions


def usable_images(questions, image_root, on_error, skips):
    """Every image the questions use, decoded once before any model runs: a bad one stops the run
    naming it (or, with --on-error skip, its questions are counted and skipped), instead of a crash
    in the middle of a model's answers."""
    bad = {}
    for p in sorted({p for q in questions for p in q["images"]}):
        try:
            common.open_image(image_root, p)
        except common.ImageError as e:
            if on_error == "raise":
                raise SystemExit(f"07_eval: {e} (--on-error skip counts and skips its questions)") from None
            bad[p] = str(e)
    for q in questions:
        for p in q["images"]:
            if p in bad:
                skips.add(q["id"], f"unreadable image: {bad[p]}", q["key"].split(":")[0])
                break
    return [q for q in questions if not any(p in bad for p in q["images"])]


def evaluate_model(name, path, questions, first, args):
    """One model: greedy answers, accuracy by group, the mass split, the held-out pairs -> (its report
    entry, its answers' config). `first` holds what the first model decides for every model: its wrong
    answers are the mass split's `rejected` and the held-out pairs, its pair log-probs the reference."""
    t = time.time()
    model_dir, adapter = vlm.resolve_model(path)
    model, proc = vlm.load_model(model_dir, dtype=args.dtype, device=vlm.pick_device(args.device), adapter=adapter,
                                 max_image_tokens=args.max_image_tokens)
    records, config = answer_all(name, path, model, proc, questions, args)
    entry = {"model": str(path), "groups": summarise(records)}
    scored = [q for q in questions if "attr" in q]  # toy rows with a one-word answer: the mass split
    if args.mass and scored:
        entry["mass"] = model_mass(name, model, proc, scored, records, first, args)
    if args.pairs:
        if "pairs" not in first:  # the first model's mistakes, scored by every model
            first["pairs"] = mistake_pairs(questions, records)
        if first["pairs"]:
            lp = pair_logps(model, proc, first["pairs"], args)
            entry["pairs"] = pair_summary(first["pairs"], *lp, ref=first.get("ref"))
            first.setdefault("ref", lp)
    entry["seconds"] = round(time.time() - t, 1)
    return entry, config


def model_mass(name, model, proc, scored, records, first, args):
    """answer_mass for one model -> its summary per group; per question to OUT/mass-<name>.jsonl."""
    vocab = answer_vocab(scored)
    token_ids = answer_token_ids(proc, scored[0]["question"], vocab)  # per model: its own tokenizer
    if "rejected_of" not in first:  # held-out rows have no pairs file: rejected = the first model's wrong answer
        keys = {q["key"] for q in scored}
        first["rejected_of"] = {r["key"]: r["answer"] for r in records
                                if r["key"] in keys and not r["correct"] and normalise_answer(r["answer"]) in token_ids}
    if any(len(t) > 1 for t in token_ids.values()):
        print(f"07 {name} mass: answer words of several tokens, one more forward per question each: "
              + ", ".join(w for w, t in token_ids.items() if len(t) > 1))
    mass = answer_mass(name, model, proc, scored, token_ids, vocab, first["rejected_of"], args)
    common.write_jsonl(Path(args.out) / f"mass-{name}.jsonl", mass)
    return mass_summary(mass)


def write_report(report, names, questions, skips, configs, args):
    """Print the table; OUT/report.json, report.txt and the sidecar -> the report.json path."""
    text = table(report, names)
    print(text)
    out = Path(args.out) / "report.json"
    with common.atomic_write(out) as f:
        json.dump(report, f, indent=1)
    with common.atomic_write(Path(args.out) / "report.txt") as f:
        f.write(text + "\n")
    common.write_sidecar(out, args, counts={"questions": len(questions), "skipped": len(skips)}, skips=skips, models=configs)
    return out


def main(args):
    t0 = time.time()
    common.set_threads(args.threads)
    common.set_image_policy(args.max_image_pixels, args.allow_outside_root)
    models = vlm.parse_models(args.model)
    for name, path in models.items():  # every model checked before the first one runs
        try:
            vlm.resolve_model(path)
        except FileNotFoundError as e:
            raise SystemExit(f"07_eval: --model {name}={e}") from None
    skips = common.Skips()
    questions = read_questions(args, skips)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report, configs, first = {}, {}, {}
    for name, path in models.items():
        report[name], configs[name] = evaluate_model(name, path, questions, first, args)
    out = write_report(report, list(models), questions, skips, configs, args)
    if len(skips):
        print(f"skipped {len(skips)} rows: {skips.summary()}")
    print(f"07: {len(questions)} questions x {len(models)} models in {time.time() - t0:.0f} s -> {out}")
    return report


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model to score (repeat to compare): a local model directory or a 06 output directory "
                        f"(default: {' '.join(vlm.TOY_MODELS)})")
    g.add_argument("--data", nargs="+", default=[], help="question files: LLaVA-format rows and/or multiple-choice rows")
    g.add_argument("--image-root", default="data/toy/images", help="folder the rows' image paths are relative to")
    g.add_argument("--scenes", nargs="*", default=[], help="rows with `image` + `toy` attributes (the toy splits): "
                   "enables the hallucination breakdown")
    g.add_argument("--out", default="out/eval", help="output directory")
    g.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad rows: stop naming file:line, or count and skip")
    m = p.add_argument_group("method")
    m.add_argument("--max-new-tokens", type=int, default=16)
    m.add_argument("--mass", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure where each model's probability at the first answer token sits (rows with scenes)")
    m.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="also score held-out preference pairs made from the first model's mistakes")
    s = p.add_argument_group("system")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--dtype", default="auto", choices=vlm.DTYPES)
    s.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:1 ...")
    common.add_max_image_tokens_flag(s)
    common.add_image_flags(s)
    common.add_threads_flag(s)
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_stage(main, get_args)
