"""Answer extraction and equivalence (lit_latent/answers.py), table-driven."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from lit_latent import answers
from lit_latent.answers import (
    AnswerAccuracy,
    extract_answer,
    extract_boxed,
    is_equivalent,
    math_equal,
    wilson_interval,
)

@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        # --- equivalent ---
        ("18", "18", True),
        ("1600", "1,600", True),  # gsm8k golds have their commas removed, preds may not
        ("58,500", "58500", True),  # math500 gold
        ("10,\\!080", "10080", True),  # math500 gold with a thin space
        ("\\$32,\\!348", "32348", True),  # math500 gold
        ("\\$18.90", "18.9", True),  # math500 gold
        ("18", "\\$18", True),
        ("5", "5\\text{ cm}", True),
        ("5.4 \\text{ cents}", "5.4", True),  # math500 gold
        ("25", "25\\%", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{2}", "1/2", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("\\frac{270}7\\text{ degrees}", "270/7", True),  # math500 gold
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),  # math500-0
        ("\\left( \\frac{3}{2}, -13 \\right)", "(1.5, -13)", True),  # math500 gold
        ("90^\\circ", "90", True),  # math500 gold; degrees are dropped
        ("(3,4]", "(3, 4]", True),  # math500 gold, interval
        ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
        ("x \\in [-2,7]", "[-2,7]", True),  # math500 gold
        ("3, 5, 7", "7, 5, 3", True),  # math500 gold: a bare list is read as a set
        ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),  # math500 gold
        ("10\\sqrt{2}", "\\sqrt{200}", True),
        ("\\text{Evelyn}", "Evelyn", True),  # math500 gold
        ("x=2", "2", True),  # gold-first: an assignment gold accepts its value
        ("$42$", "42.", True),
        ("42", "$42$", True),
        # --- not equivalent ---
        ("2", "3", False),
        ("1/2", "1/3", False),
        ("16", "1600", False),
        ("1600", "16,00", False),
        ("\\frac{\\pi}{2}", "\\pi", False),
        ("-3", "3", False),
        ("3", "3.0001", False),
        ("(3,4]", "[3,4]", False),  # open vs closed end
        ("(-2,1)", "(1,-2)", False),  # math500 gold; tuples are ordered
        ("(6,31,-1)", "(6,31,1)", False),  # math500 gold
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)", False),
        ("(0,9) \\cup (9,36)", "(0,36)", False),  # math500 gold; 9 is excluded
        ("90^\\circ", "\\frac{\\pi}{2}", False),  # degrees are not converted to radians
        ("\\text{Evelyn}", "\\text{Navin}", False),
        ("18", None, False),
        ("18", "", False),
        ("18", "\\frac{", False),  # unparsable pred: False, no exception
    ],
)
def test_is_equivalent(gold: str, pred: str | None, expected: bool) -> None:
    assert is_equivalent(gold, pred) is expected


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ("A", "A", True),
        ("B", "(b)", True),
        ("C", "C.", True),
        ("\\text{(D)}", "D", True),
        ("A", "B", False),
        ("A", None, False),
        ("A", "", False),
        ("A", "AB", False),
    ],
)
def test_is_equivalent_multiple_choice(gold: str, pred: str | None, expected: bool) -> None:
    assert is_equivalent(gold, pred, choices=4) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{42}", "42"),
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not grouping
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # last box wins
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),  # single-token form
        ("\\boxed {x+1}", "x+1"),
        ("\\boxed{3} then \\boxed{4", "3"),  # truncated last box: previous complete one
        ("\\boxedx{3}", None),  # another macro, not a box
        ("the answer is 42", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text: str | None, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, choices, expected",
    [
        ("We get \\boxed{\\dfrac{3}{4}}.", 0, "\\dfrac{3}{4}"),
        ("3 apples and 5 pears, so 8 in all.", 0, "8"),  # last number
        ("She pays 1,600 dollars.", 0, "1600"),  # thousands comma
        ("The total is 1,234,567.89", 0, "1234567.89"),
        ("so x = -5", 0, "-5"),
        ("3-5", 0, "5"),  # a minus after a digit is subtraction
        ("It takes 3/4 of an hour", 0, "3/4"),
        ("2.50 first, then 3.75.", 0, "3.75"),
        ("no numbers here", 0, None),
        ("", 0, None),
        ("The answer is (B).", 4, "B"),
        ("Answer: C", 4, "C"),
        ("**Answer:** D", 4, "D"),
        ("\\boxed{\\text{(D)}}", 4, "D"),
        ("\\boxed{b}", 4, "B"),
        ("(A) 12 is wrong, (C) 14 is right", 4, "C"),
        ("the answer is a number", 4, None),  # lower-case 'a' is a word
        ("the answer is E", 4, None),  # out of range for 4 choices
        ("no letter at all", 4, None),
    ],
)
def test_extract_answer(text: str, choices: int, expected: str | None) -> None:
    assert extract_answer(text, choices) == expected


def _golds(path: Path, k: int | None) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    golds = [r["answer"] for r in rows]
    # gsm8k golds are all integers: a sample is enough; math500/aime are checked in full
    return random.Random(0).sample(golds, k) if k and k < len(golds) else golds


@pytest.mark.parametrize(
    "name, k",
    [
        ("math500_test.jsonl", None),
        ("aime24.jsonl", None),
        ("gsm8k_test.jsonl", 100),
        ("gsm8k_train_sample.jsonl", 100),
    ],
)
def test_every_gold_matches_itself(name: str, k: int | None, shared_data: Path) -> None:
    """math_equal skips the string fast path, so math-verify must really accept each gold."""
    bad = []
    for gold in _golds(shared_data / name, k):
        completion = f"Putting it together, the answer is $\\boxed{{{gold}}}$."
        extracted = extract_answer(completion)
        if not (is_equivalent(gold, gold) and math_equal(gold, gold) and math_equal(gold, extracted)):
            bad.append((gold, extracted))
    assert not bad, f"{len(bad)} golds fail: {bad[:5]}"


def test_works_off_main_thread() -> None:
    """Lightning callbacks and writers may run in threads, where SIGALRM cannot be used."""
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(is_equivalent("\\frac{1}{2}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]


def test_pathological_pred_times_out_on_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a timeout sympy would evaluate 2^(2^100) forever."""
    monkeypatch.setattr(answers, "MATH_VERIFY_TIMEOUT_S", 1)
    assert is_equivalent("5", "2^{2^{100}}") is False


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (50, 100, 0.4038, 0.5962),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (15, 30, 0.3315, 0.6685),
    ],
)
def test_wilson_interval(k: int, n: int, lo: float, hi: float) -> None:
    assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(5, 3)


def test_answer_accuracy() -> None:
    metric = AnswerAccuracy()
    metric.update(True)
    metric.update([False, True, True])
    metric.update(torch.tensor([False]))
    assert metric.compute().item() == pytest.approx(3 / 5)
    assert metric.interval() == pytest.approx(wilson_interval(3, 5))
    metric.reset()
    assert int(metric.total) == 0


@pytest.mark.parametrize("gold, pred", [("1000", "1,000"), ("12", "13"), ("007", "7"), ("0", "-0"), ("-5", "5"),
                                        ("1,2", "12"), ("18", "18.0"), ("250", "25")])
def test_integer_fast_path_agrees_with_math_verify(gold: str, pred: str) -> None:
    assert is_equivalent(gold, pred) == math_equal(gold, pred)
