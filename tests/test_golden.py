"""Every method's answers on the embedded model stay within tolerance of the golden ones (tests/golden).

Slow (about 3 minutes): ``python -m pytest -m slow tests/test_golden.py``, or
``python tests/golden/check.py`` for a per-method report of the records that moved
(``--exact`` for the field-by-field check a refactor must pass).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import check  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", list(check.CASES))
def test_answers_stay_within_tolerance_of_the_golden_ones(name, tmp_path):
    result = check.tolerance(name, check.run_case(name, tmp_path))
    assert result.passed, "\n".join([result.summary(), *result.problems, *result.moved])


def test_tolerance_passes_the_golden_records_and_fails_when_answers_or_accuracy_move():
    golden = check.golden_records("latentseek_self")
    assert check.tolerance("latentseek_self", golden).passed

    # 4 of 40 answers moved, right and wrong alike: 90% agree, accuracy unchanged -> passes
    swapped = [dict(r) for r in golden]
    right = [r for r in swapped if r["correct"]][:2]
    wrong = [r for r in swapped if not r["correct"]][:2]
    for r in right + wrong:
        r["final_answer"], r["correct"] = r["final_answer"] + "0", not r["correct"]
    result = check.tolerance("latentseek_self", swapped)
    assert result.passed and result.same_answers == 36 and len(result.moved) == 4

    # a fifth answer moves: 35 of 40 agree -> fails on agreement
    r = next(r for r in swapped if r not in right + wrong)
    r["final_answer"] = r["final_answer"] + "0"
    assert "only 35 of 40" in check.tolerance("latentseek_self", swapped).problems[0]

    # two right answers turn wrong: agreement 38/40 holds, accuracy moves by 2 records -> fails
    worse = [dict(r) for r in golden]
    for r in [r for r in worse if r["correct"]][:2]:
        r["final_answer"], r["correct"] = "-1", False
    problems = check.tolerance("latentseek_self", worse).problems
    assert len(problems) == 1 and "at most 1 apart" in problems[0]
