"""Every prompt the framework sends to a model, defined once.

The embedded model is trained on exactly these strings (``lit_latent.embedded``) and the
self-reward callback asks them at test time, so the two can never drift apart.

A prompt here is the *user message*; the tokenizer's chat template wraps it.
Verification prompts are answered with a one-word verdict, ``yes`` or ``no``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

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
# and weights follow the papers (ALGORITHMS.md §1 and §2), the weights live in the config.

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


def final_check_prompt(solution: str) -> str:
    """Does the boxed answer equal the result of the last calculation line?"""
    return (
        f"Solution: {solution.strip()}\n"
        f"Is the boxed answer the result of the last line? {VERDICT_INSTRUCTION}"
    )


def operand_check_prompt(problem: str, line: str) -> str:
    """Are the numbers of this line copied from the problem or from earlier results?"""
    return (
        f"Problem: {problem.strip()}\nLine: {line.strip()}\n"
        f"Are the numbers in this line taken correctly? {VERDICT_INSTRUCTION}"
    )


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
