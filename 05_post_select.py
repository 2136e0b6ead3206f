"""
05_post_select.py — stage 5: pairs -> cleaned pairs (duplicates, perplexity, length ratio, edit distance, balance).
in : pairs JSONL from 04 (one file or its shards)     out: pairs JSONL (+ .meta.json), optional TRL export

  python 05_post_select.py                    # toy: data/toy/pairs.jsonl -> data/toy/pairs.post.jsonl
  python 05_post_select.py --data data/pairs-0*-of-04.jsonl --out data/pairs.post.jsonl --recipe paper
  python 05_post_select.py --trl-out data/toy/pairs.trl.jsonl   # also TRL's preference schema

Recipes (flags left unset): `paper` keeps every format; `toy` keeps the sequence pairs only (at
4 visual tokens per toy image a grid cell is smaller than one token, README). `--recipe auto`
picks toy when the pairs came from a model 00 built (their ref_model.path), paper otherwise.

The paper names three filters and released no thresholds for two of them; our defaults, each a flag:
  duplicates      same images, prompt, chosen and rejected (shards or reruns merged): keep the first.
  perplexity      keep 1.1 < PPL <= 10 (PPL of the rejected answer + EOS under the model, from 04).
                  The floor repeats 04's rule (a no-op unless 04 ran with another --min-ppl). The
                  ceiling: a greedy answer whose tokens average a probability under 1/10 is closer
                  to babble than to what the model believes, and pushing babble down teaches the
                  model little. A short wrong answer at chance among ~8 options (answer + EOS:
                  PPL ~ sqrt(8) ~ 2.8) is kept.
  length ratio    keep max(words) / min(words) <= 3 (an empty side counts as 1 word). DPO compares
                  summed log-probs, which grow with length: far beyond 3x the pair mostly says
                  "be shorter/longer". Within it, 'red' vs 'it is red' is kept.
  edit distance   keep normalised Levenshtein distance >= 0.05 (rapidfuzz, on common.normalise_answer's
                  text: lower case, no articles, no punctuation at word edges, single spaces — the rule
                  04 and 07 judge "the same answer" by; 0 = identical, 1 = nothing shared). It drops
                  pairs equal up to punctuation and typo-level differences (one character in 20),
                  and keeps a single colour swapped in a sentence of up to ~80 characters — the
                  hallucinations the method is for.
  balance         off by default; `equal` cuts every format to the rarest one's count, `paper` to the
                  authors' final mix (15.1k sequence : 9.3k grid : 4.5k pic-in-pic). Which pairs go
                  is a seeded draw per id, so the result does not depend on input order.
  formats         the recipe's (toy: sequence, paper: all); the pairs of other formats are counted as dropped.
  sample          off by default; `--sample-like other.jsonl` keeps a seeded random subset with as
                  many pairs per format as that file: the control of a selection ablation (random
                  wrong answers vs attention-selected ones, same size and mix).
Prints a table of how many pairs each filter dropped per format; the sidecar has it and the ids.
"""
import argparse
import time
from pathlib import Path

import common
import vlm
from common import DataError, Skips, normalise_answer, read_rows, row_rng, write_jsonl, write_sidecar

# ---- method: what the paper specifies (edit me) ----
MIN_PPL, MAX_PPL = 1.1, 10.0
MAX_LENGTH_RATIO = 3.0
MIN_EDIT_DISTANCE = 0.05
MIXES = {"paper": {"sequence": 15.1, "grid": 9.3, "pip": 4.5}, "equal": {"sequence": 1, "grid": 1, "pip": 1}}
RECIPES = {"toy": {"formats": ["sequence"]}, "paper": {"formats": ["sequence", "grid", "pip"]}}


def length_ratio(chosen, rejected):
    """Longer over shorter side, in words (at least 1): ('red', 'it is red') -> 3.0; ('', 'no') -> 1.0."""
    a, b = max(1, len(chosen.split())), max(1, len(rejected.split()))
    return max(a, b) / min(a, b)


def edit_distance(chosen, rejected):
    """Normalised Levenshtein distance of the normalised answers: ('The red.', 'red') -> 0.0;
    ('red', 'blue') -> 1.0; ('a red car', 'a blue car') -> 0.5 ('red car' vs 'blue car': 4 edits / 8)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_distance(normalise_answer(chosen), normalise_answer(rejected))


def balance_counts(counts, mix):
    """Pairs per format -> how many to keep so the kept counts follow `mix` as closely as the rarest allows.
    {'sequence': 100, 'grid': 50, 'pip': 10}, equal -> 10 each; paper -> sequence 33, grid 20, pip 10."""
    present = {f: n for f, n in counts.items() if n > 0}
    unknown = set(present) - set(mix)
    if unknown:
        raise ValueError(f"no balance weight for format(s) {sorted(unknown)}")
    scale = min(n / mix[f] for f, n in present.items()) if present else 0
    return {f: min(n, int(scale * mix[f] + 1e-9)) for f, n in present.items()}


def post_select(pairs, min_ppl=MIN_PPL, max_ppl=MAX_PPL, max_length_ratio=MAX_LENGTH_RATIO,
                min_edit_distance=MIN_EDIT_DISTANCE, balance=None, seed=0, sample=None, formats=None):
    """pairs (dicts as 04 writes them) -> (kept, dropped [(filter, reason, pair)]), filters in this order.
    `formats`: first, keep only these formats. `sample` ({format: n}): last, keep a seeded random n
    of each format (an ablation's control set)."""
    dropped, kept, seen = [], [], set()
    if formats is not None:
        dropped += [("format", f"format {p['mia']['format']} not kept", p) for p in pairs if p["mia"]["format"] not in formats]
        pairs = [p for p in pairs if p["mia"]["format"] in formats]
    for p in pairs:
        key = (tuple(p["image"]), p["prompt"], p["chosen"], p["rejected"])
        ppl = p["probe"]["ppl"]
        ppl = float("inf") if ppl is None else ppl
        lr, ed = length_ratio(p["chosen"], p["rejected"]), edit_distance(p["chosen"], p["rejected"])
        if key in seen:
            dropped.append(("duplicates", "duplicate of an earlier pair", p))
        elif not min_ppl < ppl <= max_ppl:
            dropped.append(("perplexity", f"ppl {ppl:.3g} outside ({min_ppl}, {max_ppl}]", p))
        elif lr > max_length_ratio:
            dropped.append(("length ratio", f"length ratio {lr:.2f} > {max_length_ratio}", p))
        elif ed < min_edit_distance:
            dropped.append(("edit distance", f"edit distance {ed:.3f} < {min_edit_distance}", p))
        else:
            kept.append(p)
        seen.add(key)
    if balance:
        counts = {}
        for p in kept:
            counts[p["mia"]["format"]] = counts.get(p["mia"]["format"], 0) + 1
        kept, dropped = _draw(kept, dropped, balance_counts(counts, MIXES[balance]), seed, "balance", f"balance {balance}")
    if sample is not None:
        kept, dropped = _draw(kept, dropped, sample, seed, "sample", "random sample")
    return kept, dropped


def _draw(kept, dropped, quota, seed, name, reason):
    """Keep a seeded random quota[format] of each format's pairs. A draw per id, not input order,
    decides who stays."""
    by_fmt, keep_ids = {}, set()
    for p in kept:
        by_fmt.setdefault(p["mia"]["format"], []).append(p)
    for f, group in by_fmt.items():
        ranked = sorted(group, key=lambda p: (row_rng(seed, f"{name}:{p['id']}").random(), p["id"]))
        keep_ids |= {p["id"] for p in ranked[: quota.get(f, 0)]}
    return [p for p in kept if p["id"] in keep_ids], dropped + [(name, reason, p) for p in kept if p["id"] not in keep_ids]


# ---- plumbing ----
FILTERS = ("format", "duplicates", "perplexity", "length ratio", "edit distance", "balance", "sample")


def load_pairs(paths):
    """All pairs of all files; the fields 05 reads are checked, errors name file, line and field."""
    pairs = []
    for path in paths:
        for line, row in read_rows(path):
            common.check_pair_row(row, path, line)
            if not isinstance(row.get("probe"), dict) or "ppl" not in row["probe"]:
                raise DataError(path, line, "probe.ppl", "missing: 05 reads the pairs 04_gen_pairs.py writes")
            if not isinstance(row.get("mia"), dict) or "format" not in row["mia"]:
                raise DataError(path, line, "mia.format", "missing: 05 reads the pairs 04_gen_pairs.py writes")
            pairs.append(row)
    if not pairs:  # an empty shard can happen; nothing at all is a mistake upstream, not "0 kept"
        raise DataError(paths[0] if len(paths) == 1 else ", ".join(map(str, paths)), None, None,
                        "no pairs to select from (04_gen_pairs.py writes them; did it find no wrong answer?)")
    return pairs


def pairs_model(path):
    """The model that made a pair file (its first row's ref_model.path; None when unreadable or empty):
    with --recipe auto, pairs from a toy model get the toy recipe."""
    try:
        for _, row in read_rows(path):
            return (row.get("ref_model") or {}).get("path")
    except DataError:
        return None  # load_pairs reports the file's problem with its line
    return None


def drop_table(pairs, kept, dropped):
    """Rows: filters; columns: formats + total -> (text table, nested dict for the sidecar)."""
    fmts = sorted({p["mia"]["format"] for p in pairs})
    table = {name: {f: 0 for f in fmts} for name in FILTERS}
    for name, _, p in dropped:
        table[name][p["mia"]["format"]] += 1
    table["in"] = {f: sum(p["mia"]["format"] == f for p in pairs) for f in fmts}
    table["kept"] = {f: sum(p["mia"]["format"] == f for p in kept) for f in fmts}
    lines = [f"{'filter':<14}" + "".join(f"{f:>10}" for f in fmts) + f"{'total':>10}"]
    for name in ("in", *FILTERS, "kept"):
        row = table[name]
        lines.append(f"{name:<14}" + "".join(f"{row[f]:>10}" for f in fmts) + f"{sum(row.values()):>10}")
    return "\n".join(lines), table


def to_trl(pairs, processor, image_root):
    """TRL's standard (not conversational) preference schema, written so that TRL's vision collator
    builds exactly the tokens 06 trains on (tests/test_train_dpo.py and tests/test_trl_qwen.py check
    it): the prompt as the chat template renders it, so the `<image>` markers stay interleaved with
    their labels (a conversational prompt would let llava-hf templates move every image to the
    front), with the BOS written out where the tokenizer would add one (TRL tokenises with
    add_special_tokens=False); chosen / rejected as render_pair continues the prompt, + EOS where the
    template writes no end token (TRL's vision path appends none); images as absolute paths (load
    with datasets and `.cast_column("images", Sequence(Image()))`)."""
    tok = processor.tokenizer
    adds_bos = tok.bos_token is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    rows = []
    for p in pairs:
        prompt, chosen = vlm.render_pair(processor, p["prompt"], p["chosen"])
        _, rejected = vlm.render_pair(processor, p["prompt"], p["rejected"])
        bos = tok.bos_token if adds_bos and not prompt.startswith(tok.bos_token) else ""
        rows.append({"id": p["id"], "prompt": bos + prompt, "chosen": vlm.with_stop(tok, chosen),
                     "rejected": vlm.with_stop(tok, rejected),
                     "images": [str((Path(image_root) / x).resolve()) for x in p["image"]]})
    return rows


def main(args):
    t0 = time.time()
    pairs = load_pairs(args.data)
    sample = None
    if args.sample_like:  # as many pairs per format as another pair file holds
        sample = {}
        for p in load_pairs([args.sample_like]):
            sample[p["mia"]["format"]] = sample.get(p["mia"]["format"], 0) + 1
    kept, dropped = post_select(pairs, args.min_ppl, args.max_ppl, args.max_length_ratio, args.min_edit_distance,
                                None if args.balance == "none" else args.balance, args.seed, sample, args.formats)
    text, table = drop_table(pairs, kept, dropped)
    skips = Skips(keep=10000)
    for name, reason, p in dropped:
        skips.add(p["id"], f"{name}: {reason}")
    write_jsonl(args.out, kept)
    write_sidecar(args.out, args, counts={"in": len(pairs), "kept": len(kept), "table": table}, skips=skips)
    if args.trl_out:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        write_jsonl(args.trl_out, to_trl(kept, processor, args.image_root))
        write_sidecar(args.trl_out, args, counts={"pairs": len(kept)}, source=str(args.out))
    print(text)
    print(f"05_post_select: {len(pairs)} pairs -> {len(kept)} kept in {args.out}"
          + (f" (+ TRL schema: {args.trl_out})" if args.trl_out else "") + f" | {time.time() - t0:.1f} s")
    return kept, dropped


def get_args(argv=None):
    toy = Path("data/toy")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[3:7]))
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, nargs="+", default=[toy / "pairs.jsonl"],
                   help="pairs JSONL from 04 (shards are merged)")
    g.add_argument("--out", type=Path, default=toy / "pairs.post.jsonl", help="kept pairs, same fields as the input")
    g.add_argument("--trl-out", type=Path, help="also write the kept pairs in TRL's preference schema here")
    g.add_argument("--model", type=Path, default=Path("models/toy-llava"),
                   help="with --trl-out: the model whose processor's template renders the prompts")
    g.add_argument("--image-root", type=Path, default=toy / "images",
                   help="with --trl-out: the folder image paths are relative to")
    m = p.add_argument_group("method")
    m.add_argument("--min-ppl", type=float, default=MIN_PPL, help="keep PPL above this")
    m.add_argument("--max-ppl", type=float, default=MAX_PPL, help="keep PPL at or below this")
    m.add_argument("--max-length-ratio", type=float, default=MAX_LENGTH_RATIO,
                   help="keep longer/shorter word count at or below this")
    m.add_argument("--min-edit-distance", type=float, default=MIN_EDIT_DISTANCE,
                   help="keep normalised edit distance at or above this")
    m.add_argument("--balance", choices=("none", "equal", "paper"), default="none", help="subsample formats to a mix")
    m.add_argument("--recipe", choices=("auto", "toy", "paper"), default="auto",
                   help="where unset flags come from: auto = toy for pairs a toy model made, else paper")
    m.add_argument("--formats", nargs="+", help="keep only pairs of these formats (toy: sequence; paper: all)")
    m.add_argument("--sample-like", type=Path, help="finally keep a random subset with as many pairs per format as "
                   "this pair file (the random-selection control of an ablation)")
    m.add_argument("--seed", type=int, default=0, help="seeds the balancing and sampling draws (with each pair's id)")
    a = p.parse_args(argv)
    if any(Path(a.out).resolve() == Path(d).resolve() for d in a.data):
        p.error("--out would overwrite an input")
    source = pairs_model(a.data[0])
    return common.apply_recipe(a, RECIPES, common.is_toy_model(source), "05_post_select", why=f"pairs from {source}")


if __name__ == "__main__":
    common.run_stage(main, get_args)
