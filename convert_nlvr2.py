"""
convert_nlvr2.py — NLVR2 as 07's multiple-choice rows, which 07_eval.py scores (the paper's NLVR2 column).
The paper's 6,967 NLVR2 questions are its test-P split (test1.json), which neither VLMEvalKit nor lmms-eval runs.
in : NLVR2's test1.json or dev.json (JSON lines: identifier, sentence, label)    out: OUT (JSONL)
  python convert_nlvr2.py --data nlvr2/test1.json --out nlvr2_mc.jsonl
  python 07_eval.py --model base=... --model dpo=... --data nlvr2_mc.jsonl --image-root nlvr2/test1

Each row asks "Is this statement true of the two images?" with the left and right image in order
and the options true / false; the images are named as NLVR2 names them
(https://github.com/lil-lab/nlvr/tree/master/nlvr2): identifier "test1-769-1-0" ->
test1-769-1-img0.png (left), test1-769-1-img1.png (right). A label other than True or False stops
the run, naming file:line.
"""
from __future__ import annotations

import argparse

import common


def nlvr2_row(row):
    """One NLVR2 row (test1.json / dev.json: identifier, sentence, label) -> 07's multiple-choice row.
    Images follow NLVR2's naming: identifier "test1-769-1-0" -> test1-769-1-img0.png, -img1.png."""
    prefix = row["identifier"].rsplit("-", 1)[0]
    label = str(row["label"]).strip().lower()
    if label not in ("true", "false"):
        raise ValueError(f"label {row['label']!r} is not True or False")
    return {"id": row["identifier"], "images": [f"{prefix}-img0.png", f"{prefix}-img1.png"],
            "question": f"Left image:<image>\nRight image:<image>\nIs this statement true of the two images? "
                        f"\"{row['sentence'].strip()}\"",
            "options": ["true", "false"], "answer": "A" if label == "true" else "B", "group": "NLVR2"}


def main(args):
    rows = []
    for line, r in common.read_rows(args.data):
        try:
            rows.append(nlvr2_row(r))
        except (KeyError, ValueError) as e:
            raise common.DataError(args.data, line, "label" if isinstance(e, ValueError) else str(e), str(e)) from None
    n = common.write_jsonl(args.out, rows)
    print(f"07 convert-nlvr2: {n} rows -> {args.out}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="score them with 07_eval.py --data OUT --image-root <NLVR2's images of that split>")
    p.add_argument("--data", required=True, help="NLVR2's test1.json (test-P, 6,967 rows) or dev.json")
    p.add_argument("--out", required=True, help="the multiple-choice rows (JSONL)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_stage(main, get_args)
