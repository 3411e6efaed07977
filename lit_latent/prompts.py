"""Every prompt the framework sends to a model, defined once.

The embedded model is trained on exactly these strings (``lit_latent.embedded``) and the
self-reward callback asks them at test time, so the two can never drift apart.

A prompt here is the *user message*; the tokenizer's chat template wraps it.
Verification prompts are answered with a one-word verdict, ``yes`` or ``no``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from lit_latent.boxed import extract_boxed

SOLVE_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
CHOICE_INSTRUCTION = "Think step by step, then put the letter of the correct choice in \\boxed{}."
LETTERS = "ABCDEFGHIJ"


def math_prompt(problem: str) -> str:
    return f"{SOLVE_INSTRUCTION}\n{problem.strip()}"


def choice_prompt(problem: str, choices: Sequence[str]) -> str:
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{problem.strip()}\n{listed}\n{CHOICE_INSTRUCTION}"


# --- Verification -------------------------------------------------------------------------
# Holistic checks see the whole problem and solution. Their wording is ours; the criteria
# and weights follow the papers (docs/algorithms.md §1 and §2), the weights live in the config.

VERDICT_INSTRUCTION = "Answer yes or no."

HOLISTIC_QUESTIONS = {
    # LatentSeek's four checks
    "calculation": "Are all the calculations in the solution correct?",
    "answer": "Is the final answer of the solution correct for the problem?",
    "complete": "Is the solution complete, with a clear final answer in a box?",
    "understood": "Does the solution use the numbers of the problem correctly?",
    # LatentEvolve's extra criteria
    "format": "Is the final answer written in the required \\boxed{} format?",
    "clarity": "Does the solution state one explicit final answer?",
}


def holistic_check_prompt(check: str, problem: str, solution: str) -> str:
    if check not in HOLISTIC_QUESTIONS:
        raise ValueError(f"unknown check {check!r}; known: {sorted(HOLISTIC_QUESTIONS)}")
    return (
        f"Problem: {problem.strip()}\nSolution: {solution.strip()}\n"
        f"{HOLISTIC_QUESTIONS[check]} {VERDICT_INSTRUCTION}"
    )


# Step-level checks: one line at a time, what a small model can judge.


def step_check_prompt(line: str) -> str:
    """Is this one calculation line arithmetically right?"""
    return f"Check this calculation: {line.strip()}\nIs it right? {VERDICT_INSTRUCTION}"


# Final check: does the boxed answer equal the last calculation line's result? Asked about the
# whole solution for a one-word verdict, the embedded model learned shortcuts (a missing or
# doubled box) but not the comparison: it caught 63% of wrong boxed answers. Asked to compare
# the two numbers pair of digits by pair of digits, it had not learned to tell two digits
# apart after 25 of its 45 minutes. So, as in the recompute check, the model produces the
# number and code compares: the prompt gives the solution's calculation lines (not its answer
# sentence, so the box cannot be copied), the model writes the last line's result, and the
# check passes when that equals the boxed answer.

# new tokens a final check takes: the result's digits and eos
FINAL_CHECK_TOKENS = 12
# every flat ``\\boxed{...}`` of a worked solution: counts the boxes of the embedded model's
# candidates (no nested braces there); the final check reads the last box with extract_boxed
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_check_values(solution: str) -> tuple[Optional[str], Optional[str]]:
    """(last line's result, last boxed answer) of a solution, spaces removed; None for a
    solution with no calculation line or no ``\\boxed{}``."""
    lines = calculation_lines(solution)
    boxed = extract_boxed(solution)
    result = lines[-1].rsplit("=", 1)[1].replace(" ", "") if lines else None
    return result, (boxed.replace(" ", "") if boxed is not None else None)


def final_check_prompt(solution: str) -> str:
    """Asks for the result of the solution's last calculation line."""
    lines = calculation_lines(solution)
    listed = "\n".join(lines) if lines else "none"
    return f"Calculation lines:\n{listed}\nWhat is the result of the last line?"


def final_check_answer(solution: str) -> str:
    """What the model is trained to write for ``final_check_prompt(solution)``: the last
    line's result as written there, or ``none`` when the solution has no calculation line."""
    result, _ = final_check_values(solution)
    return "none" if result is None else result


_FIRST_WORD = re.compile(r"\s*(\S+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def parse_final_check(generated: str, solution: str) -> Optional[bool]:
    """The final check's verdict: the result the model wrote equals the solution's boxed
    answer (commas ignored). The result is the first number it wrote (a chat model may say
    "The result is 168."), else its first word. None when it wrote nothing; False when the
    solution has no box."""
    m = _FIRST_WORD.match(generated)
    if m is None:
        return None
    number = _NUMBER.search(generated)
    written = number.group(0) if number else m.group(1).rstrip(".")
    _, boxed = final_check_values(solution)
    return boxed is not None and written.replace(",", "") == boxed.replace(",", "")


def operand_check_prompt(problem: str, line: str) -> str:
    """Are the numbers of this line copied from the problem or from earlier results?"""
    return (
        f"Problem: {problem.strip()}\nLine: {line.strip()}\n"
        f"Are the numbers in this line taken correctly? {VERDICT_INSTRUCTION}"
    )


# Recompute check: the model redoes one line's calculation column by column, last digits
# first, writing for each column its two digits, the result digit and the carry. Solutions
# write digits first-to-last, which is where this model errs (a carry lost in the tens); here
# each result digit needs only the column just written and the carry before it, a different
# route to the number, so its errors rarely coincide with the line's. The prompt only lays out
# the line's own digits in columns (no arithmetic); the model does the sums, and the number it
# wrote is compared with the line's result in code.

# new tokens a recomputation of up to five columns takes (nine each, see recompute_answer) and eos
RECOMPUTE_TOKENS = 48

_WHOLE_LINE = re.compile(r"^\s*(\d+)\s*([-+×÷*/])\s*(\d+)\s*=\s*(\d+)\s*$")


def parse_line(line: str) -> Optional[tuple[int, str, int, int]]:
    """``(a, op, b, c)`` of one whole-number calculation line ``a op b = c`` (``*`` and ``/``
    read as ``×`` and ``÷``), or None."""
    m = _WHOLE_LINE.match(line)
    if m is None:
        return None
    op = {"*": "×", "/": "÷"}.get(m.group(2), m.group(2))
    return int(m.group(1)), op, int(m.group(3)), int(m.group(4))


def columns(x: int, op: str, y: int) -> list[tuple[str, str]]:
    """Digit pairs of ``x`` and ``y`` from the last digit up, the shorter padded with 0; for a
    product, the one-digit ``y`` is paired with every digit of ``x``."""
    xs, ys = str(x)[::-1], str(y)[::-1]
    if op == "×":
        return [(d, ys) for d in xs]
    width = max(len(xs), len(ys))
    return list(zip(xs.ljust(width, "0"), ys.ljust(width, "0")))


def recompute_prompt(x: int, op: str, y: int) -> str:
    pairs = ", ".join(f"{a} {b}" for a, b in columns(x, op, y))
    return f"Work out {x} {op} {y} column by column, last digits first: {pairs}."


def recompute_answer(x: int, op: str, y: int) -> str:
    """What the model is trained to write for ``recompute_prompt(x, op, y)``: per column its two
    digits, the result digit and the carry (the borrow, for a difference), e.g. ``96 + 8`` ->
    ``6 8 4 1, 9 0 0 1``."""
    groups, carry = [], 0
    for a, b in columns(x, op, y):
        a, b = int(a), int(b)
        if op == "+":
            total = a + b + carry
            digit, carry = total % 10, total // 10
        elif op == "-":
            total = a - b - carry
            digit, carry = total % 10, int(total < 0)
        else:
            total = a * b + carry
            digit, carry = total % 10, total // 10
        groups.append(f"{a} {b} {digit} {carry}")
    return ", ".join(groups)


_COLUMN = re.compile(r"(\d) (\d) (\d) (\d)")


def parse_recomputed(generated: str, op: str) -> Optional[int]:
    """The number the model worked out in ``generated`` (an answer in ``recompute_answer``'s
    form): its result digits, last first, then the final carry of a sum or product. None when
    the text is not in that form, or a difference ends with a borrow (a negative result)."""
    groups = generated.strip().split(", ")
    found = [_COLUMN.fullmatch(g) for g in groups]
    if not all(found):
        return None
    digits = "".join(m.group(3) for m in found)[::-1]
    carry = found[-1].group(4)
    if op == "-":
        return None if carry != "0" else int(digits)
    return int(carry + digits)


def recompute_operands(a: int, op: str, b: int, c: int) -> Optional[tuple[int, str, int, int]]:
    """``(x, op, y, claimed)`` for the recompute check of the line ``a op b = c``: ``a op b``
    against ``c``, a product with its one-digit factor second, and a division ``a ÷ b = c`` as
    the product ``b × c`` against ``a`` (whole-number division is right exactly when that
    product gives back ``a``). None for a product of two numbers of several digits (no column
    layout fits it)."""
    if op in "+-":
        return a, op, b, c
    x, y, claimed = (a, b, c) if op == "×" else (b, c, a)
    if y >= 10:
        x, y = y, x
    return (x, "×", y, claimed) if y < 10 else None


def recompute_question(line: str) -> Optional[tuple[str, str, int]]:
    """(user message, operation asked, the value the line claims) for the recompute check of
    one line, or None when it is not one whole-number calculation or no column layout fits it."""
    parsed = parse_line(line)
    found = None if parsed is None else recompute_operands(*parsed)
    if found is None:
        return None
    x, op, y, claimed = found
    return recompute_prompt(x, op, y), op, claimed


_CALC_LINE = re.compile(r"^\s*-?\d[\d,]*(?:\.\d+)?\s*[-+*/×÷]\s*-?\d[\d,]*(?:\.\d+)?\s*=\s*-?[\d,.]+\s*$")


def is_answer_line(line: str) -> bool:
    """The closing sentence of a solution ("The answer is \\boxed{N}."), not a step: the
    calculation checks leave it out, in training labels and in the self-reward alike."""
    return "\\boxed" in line or "answer is" in line.lower()


def calculation_lines(solution: str) -> list[str]:
    """The lines of a solution that are a single calculation ``a op b = c``."""
    return [ln.strip() for ln in solution.splitlines() if _CALC_LINE.match(ln)]


_VERDICT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_verdict(generated: str) -> Optional[bool]:
    """Parse the verdict from the *generated continuation only*.

    The reference LatentSeek code matched the verdict in the decoded text including the
    prompt, so the prompt's own example verdict always matched. Anything that does not start
    with yes/no is ``None``, which callers count as a failed check.
    """
    m = _VERDICT.match(generated)
    if m is None:
        return None
    return m.group(1).lower() == "yes"
