"""One rule for "the same answer": common.normalise_answer, as 04 (is the answer wrong?), 05 (is
the rejected a different answer?) and 07 (is the answer right?) apply it."""
import importlib

import pytest

import common

gen = importlib.import_module("04_gen_pairs")
post = importlib.import_module("05_post_select")
ev = importlib.import_module("07_eval")


@pytest.mark.parametrize("text,want", [
    ("The Red.", "red"), ("  light   BLUE!", "light blue"), ("an apple", "apple"), ("", ""),
    ("it's 3:00", "it's 3:00"),  # inner punctuation is kept: a time, a decimal, a contraction
    ("3.5", "3.5"), ('"Red", I think.', "red i think"), ("A", "a"),  # articles alone are kept
])
def test_normalise_answer_hand_cases(text, want):
    assert common.normalise_answer(text) == want


@pytest.mark.parametrize("answer", ["The red", "red.", " RED ", "the Red!"])
def test_every_stage_judges_the_red_and_red_the_same(answer):
    truth = "red"
    # 04: not a pair, whatever the attention says
    assert gen.select(answer, truth, ppl=2.0, ratio=0.1, limit=0.8, inclusive=True) == "answer equals ground truth"
    # 05: nothing between them (and a pair row claiming so is refused when read)
    assert post.edit_distance(truth, answer) == 0.0
    row = {"id": "p", "image": ["a.png"], "prompt": "<image>\nWhat color?", "chosen": truth, "rejected": answer}
    with pytest.raises(common.DataError, match="rejected: the same answer as chosen"):
        common.check_pair_row(row, "pairs.jsonl", 1)
    # 07: counted as right
    q = {"key": "k", "id": "q", "group": "single", "gold": truth, "kind": "open"}
    assert ev.score(q, answer)["correct"]


def test_different_answers_stay_different():
    assert gen.select("blue", "red", ppl=2.0, ratio=0.1, limit=0.8, inclusive=True) == "selected"
    assert post.edit_distance("red", "a blue") == 1.0
    assert not ev.score({"key": "k", "id": "q", "group": "single", "gold": "red", "kind": "open"}, "blue")["correct"]
