"""Checking-task data: candidate solutions, their mechanical labels, and verdict examples.

Every checking example is a user message built by a prompt function of
``lit_latent.prompts`` and an assistant answer that is exactly ``yes`` or ``no``, except the
two checks where the model works out a number that code compares: the recompute check
(``recompute_example``) and the final check (``final_example``).

Candidate solutions (``CANDIDATE_KINDS``), each made from a problem's gold solution:

- ``correct``: the gold solution.
- ``wrong_step``: one step's result is off (small offset, a changed digit, swapped digits),
  and later steps that use it are recomputed from the wrong value (propagated).
- ``wrong_final``: the boxed answer differs from the last line's result.
- ``missing_step``: one calculation line is removed; the rest is unchanged.
- ``no_boxed``: the final line has no ``\\boxed{}`` or is dropped.
- ``miscopied_operand``: a number taken from the problem is mis-copied in one line,
  propagated to later steps.
- ``garbled``: what latent edits produce: a span replaced by random pieces of the
  solution's own text, a truncated chain, a repeated or dropped line, fused lines.
- ``two_answers``: an extra, different ``\\boxed{}`` answer is appended.

Labels are computed from the text alone, never from the kind, so every example is right
by construction:

- step check (``step_check_prompt(line)``): yes iff the line ``a op b = c`` is arithmetically
  true (for ``÷``: ``b × c == a``).
- final check (``final_check_prompt(solution)``): yes iff the solution has a calculation line
  and a ``\\boxed{}`` answer and the last boxed value equals the last line's result (as text,
  spaces removed: ``prompts.final_check_values``). The model is trained to answer it with
  that result (``final_example``), which is compared with the box in code; the label is
  what that comparison gives when the model copies the result right.
- operand check (``operand_check_prompt(problem, line)``): yes iff each operand of the line
  is a number stated in the problem or the result of a step of the gold solution.
- holistic checks (``holistic_check_prompt(check, problem, solution)``):

  - ``calculation``: there is at least one calculation line, and every line except the
    answer sentence is a calculation line that is arithmetically true.
  - ``answer``: the last boxed value equals the gold answer.
  - ``complete``: as many calculation lines as the gold solution has steps, and a
    ``\\boxed{}`` answer.
  - ``understood``: at least one calculation line, and every operand of every calculation
    line is a number stated in the problem or the result of an earlier line of the
    solution itself.
  - ``format``: the solution contains ``\\boxed{N}`` with a whole number N.
  - ``clarity``: the solution contains exactly one ``\\boxed{...}``.

``check_example`` draws a target verdict 50/50 and samples candidates until the label
matches, so every check type is balanced.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from lit_latent.prompts import (
    BOXED,
    HOLISTIC_QUESTIONS,
    calculation_lines,
    final_check_answer,
    final_check_prompt,
    final_check_values,
    holistic_check_prompt,
    is_answer_line,
    operand_check_prompt,
    parse_line,
    recompute_answer,
    recompute_operands,
    recompute_prompt,
    step_check_prompt,
)
from lit_latent.embedded.problems import format_solution, numbers_in

CANDIDATE_KINDS = ("correct", "wrong_step", "wrong_final", "missing_step", "no_boxed",
                   "miscopied_operand", "garbled", "two_answers")
TASKS = ("step", "final", "operand") + tuple(f"holistic:{c}" for c in HOLISTIC_QUESTIONS)


# --- parsing and labels ---------------------------------------------------------------------

def line_true(line: str) -> bool:
    p = parse_line(line)
    if p is None:
        return False
    a, op, b, c = p
    if op == "+":
        return a + b == c
    if op == "-":
        return a - b == c
    if op == "×":
        return a * b == c
    return b != 0 and b * c == a


def boxed_values(solution: str) -> list[str]:
    return [v.strip() for v in BOXED.findall(solution)]


def parsed_lines(solution: str) -> list[tuple[int, str, int, int]]:
    return [p for p in (parse_line(ln) for ln in calculation_lines(solution)) if p is not None]


def final_label(solution: str) -> bool:
    result, boxed = final_check_values(solution)
    return result is not None and result == boxed


def operand_label(problem: dict, line: str) -> bool:
    p = parse_line(line)
    if p is None:
        return False
    allowed = set(numbers_in(problem["problem"])) | {c for *_, c in parsed_lines(problem["solution"])}
    return p[0] in allowed and p[2] in allowed


def holistic_label(check: str, problem: dict, solution: str) -> bool:
    boxed = boxed_values(solution)
    lines = parsed_lines(solution)
    if check == "calculation":
        body = [ln for ln in solution.splitlines() if ln.strip() and not is_answer_line(ln)]
        return bool(lines) and all(line_true(ln) for ln in body)
    if check == "answer":
        return bool(boxed) and boxed[-1] == str(problem["answer"])
    if check == "complete":
        return len(lines) == problem["steps"] and bool(boxed)
    if check == "understood":
        known = set(numbers_in(problem["problem"]))
        for a, _, b, c in lines:
            if a not in known or b not in known:
                return False
            known.add(c)
        return bool(lines)
    if check == "format":
        return any(v.isdigit() for v in boxed)
    if check == "clarity":
        return len(boxed) == 1
    raise ValueError(f"unknown check {check!r}; known: {sorted(HOLISTIC_QUESTIONS)}")


# --- candidate solutions ------------------------------------------------------------------

def perturb(rng: random.Random, n: int) -> int:
    """A plausible wrong value near ``n`` (never ``n``, never negative)."""
    for _ in range(20):
        r = rng.random()
        s = str(n)
        if r < 0.4:
            m = n + rng.choice([-1, 1]) * rng.randint(1, 3)
        elif r < 0.6:
            m = n + rng.choice([-1, 1]) * rng.randint(4, 10)
        elif r < 0.72:
            m = n + rng.choice([-1, 1]) * 10 * rng.randint(1, 3)
        elif r < 0.9:
            i = rng.randrange(len(s))
            m = int(s[:i] + str(rng.randint(0, 9)) + s[i + 1:])
        elif len(s) > 1:
            i = rng.randrange(len(s) - 1)
            m = int(s[:i] + s[i + 1] + s[i] + s[i + 2:])
        else:
            m = n + 1
        if m != n and m >= 0:
            return m
    return n + 1


def _program(problem: dict):
    """The gold lines with each operand as ``('res', k)`` (result of step k) or a literal."""
    lines = parsed_lines(problem["solution"])
    prog = []
    for i, (a, op, b, _) in enumerate(lines):
        refs = []
        for x in (a, b):
            k = max((j for j in range(i) if lines[j][3] == x), default=None)
            refs.append(("res", k) if k is not None else ("lit", x))
        prog.append((refs[0], op, refs[1]))
    return prog


def _run(prog, result_fix: dict = {}, operand_fix: dict = {}):
    """Re-execute the program; fixed results/operands propagate to later steps."""
    out = []
    for i, (ra, op, rb) in enumerate(prog):
        vals = [out[r[1]][3] if r[0] == "res" else r[1] for r in (ra, rb)]
        for pos in (0, 1):
            if (i, pos) in operand_fix:
                vals[pos] = operand_fix[(i, pos)]
        a, b = vals
        if op == "÷":
            c = a // b if b else 0
        else:
            c = a + b if op == "+" else a - b if op == "-" else a * b
        if i in result_fix:
            c = result_fix[i]
        out.append((a, op, b, c))
    return out


def _garble(rng: random.Random, text: str) -> str:
    r = rng.random()
    lines = text.split("\n")
    if r < 0.35:
        # replace a span with random pieces of the solution's own text
        pieces = re.findall(r"\d|[a-zA-Z]+|[^\sa-zA-Z\d]|\s", text)
        i = rng.randrange(len(pieces))
        j = min(len(pieces), i + rng.randint(1, 6))
        pieces[i:j] = [rng.choice(pieces) for _ in range(rng.randint(1, 6))]
        return "".join(pieces)
    if r < 0.55:
        return text[: rng.randint(1, max(1, len(text) - 1))]
    if r < 0.7 and len(lines) > 1:
        i = rng.randrange(len(lines) - 1)
        lines.insert(i, lines[i])
        return "\n".join(lines)
    if r < 0.85 and len(lines) > 2:
        i = rng.randrange(len(lines) - 2)
        lines[i:i + 2] = [lines[i] + " " + lines[i + 1]]
        return "\n".join(lines)
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(len(chars))
        chars[k] = rng.choice("0123456789 +-×÷=\n")
    return "".join(chars)


def candidate(rng: random.Random, problem: dict, kind: str) -> str:
    gold = problem["solution"]
    prog = _program(problem)
    lines = _run(prog)
    n = len(lines)
    if kind == "correct":
        return gold
    if kind == "wrong_step":
        i = rng.randrange(n)
        new = _run(prog, result_fix={i: perturb(rng, lines[i][3])})
        return format_solution(new, new[-1][3])
    if kind == "wrong_final":
        return format_solution(lines, perturb(rng, lines[-1][3]))
    if kind == "missing_step":
        i = rng.randrange(n)
        kept = lines[:i] + lines[i + 1:]
        answer = kept[-1][3] if (i == n - 1 and kept and rng.random() < 0.5) else lines[-1][3]
        return format_solution(kept, answer)
    if kind == "no_boxed":
        body = format_solution(lines, 0).split("\n")[:-1]
        if rng.random() < 0.6:
            body.append(f"The answer is {lines[-1][3]}.")
        return "\n".join(body)
    if kind == "miscopied_operand":
        spots = [(i, pos) for i, (ra, _, rb) in enumerate(prog) for pos, r in enumerate((ra, rb)) if r[0] == "lit"]
        i, pos = rng.choice(spots)
        wrong = perturb(rng, prog[i][pos * 2][1])
        if prog[i][1] == "÷" and pos == 1:
            wrong = max(wrong, 1)
        new = _run(prog, operand_fix={(i, pos): wrong})
        return format_solution(new, new[-1][3])
    if kind == "garbled":
        base = candidate(rng, problem, rng.choice(["correct", "wrong_step", "miscopied_operand"]))
        return _garble(rng, base)
    if kind == "two_answers":
        return gold + f"\nThe answer is \\boxed{{{perturb(rng, lines[-1][3])}}}."
    raise ValueError(f"unknown candidate kind {kind!r}; known: {CANDIDATE_KINDS}")


# --- verdict examples -----------------------------------------------------------------------

_KIND_WEIGHTS = {"correct": 3, "wrong_step": 3, "wrong_final": 2, "missing_step": 1, "no_boxed": 1,
                 "miscopied_operand": 2, "garbled": 2, "two_answers": 1}


def _random_kind(rng: random.Random) -> str:
    return rng.choices(list(_KIND_WEIGHTS), weights=list(_KIND_WEIGHTS.values()))[0]


def step_line(rng: random.Random, problem: dict, want: bool) -> str:
    """A calculation line for the step-level checks: a line of the gold solution, or (``want``
    False) one with its result or an operand perturbed."""
    a, op, b, c = rng.choice(_run(_program(problem)))
    if not want:
        if rng.random() < 0.75:
            c = perturb(rng, c)
        elif rng.random() < 0.5:
            a = perturb(rng, a)
        else:
            b = max(1, perturb(rng, b))
    return f"{a} {op} {b} = {c}"


def _step_example(rng, problem, want):
    line = step_line(rng, problem, want)
    return step_check_prompt(line), line_true(line)


def _operand_example(rng, problem, want):
    for _ in range(20):
        sol = problem["solution"] if want else candidate(rng, problem, rng.choice(["miscopied_operand", "wrong_step"]))
        lines = calculation_lines(sol)
        if not lines:
            continue
        line = rng.choice(lines)
        if operand_label(problem, line) == want:
            break
    return operand_check_prompt(problem["problem"], line), operand_label(problem, line)


def recompute_example(rng: random.Random, problem: dict) -> tuple[str, str]:
    """``(user prompt, answer)`` for the recompute check: the question
    ``prompts.recompute_question`` asks of one line of the problem's gold solution, an operand
    perturbed in 30% of examples (latent edits and wrong steps put such numbers in lines), and
    the worked answer the model learns to write (``prompts.recompute_answer``: per column its
    digits, the result digit and the carry)."""
    x, op, y, _ = recompute_operands(*rng.choice(_run(_program(problem))))
    if rng.random() < 0.3:
        if rng.random() < 0.5:
            x = perturb(rng, x)
        elif op != "×":
            y = perturb(rng, y)
        else:
            y = rng.randint(2, 9)
        if op == "-" and y > x:
            x, y = y, x
    return recompute_prompt(x, op, y), recompute_answer(x, op, y)


def check_example(rng: random.Random, problem: dict, task: str, want: Optional[bool] = None) -> tuple[str, bool]:
    """``(user prompt, verdict)`` for one checking task, aiming at verdict ``want``."""
    want = rng.random() < 0.5 if want is None else want
    if task == "step":
        return _step_example(rng, problem, want)
    if task == "operand":
        return _operand_example(rng, problem, want)
    if task == "final":
        label = lambda s: final_label(s)
        make = lambda s: final_check_prompt(s)
    elif task.startswith("holistic:"):
        check = task.split(":", 1)[1]
        label = lambda s: holistic_label(check, problem, s)
        make = lambda s: holistic_check_prompt(check, problem["problem"], s)
    else:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    sol = _candidate_with_label(rng, problem, label, want)
    return make(sol), label(sol)


def _candidate_with_label(rng: random.Random, problem: dict, label, want: bool) -> str:
    for _ in range(30):
        sol = candidate(rng, problem, "correct" if want and rng.random() < 0.5 else _random_kind(rng))
        if label(sol) == want:
            break
    return sol


def final_candidate(rng: random.Random, problem: dict, want: Optional[bool] = None) -> tuple[str, bool]:
    """``(candidate solution, final_label)`` for the final check, aiming at label ``want``."""
    want = rng.random() < 0.5 if want is None else want
    sol = _candidate_with_label(rng, problem, final_label, want)
    return sol, final_label(sol)


def final_example(rng: random.Random, problem: dict) -> tuple[str, str]:
    """``(user prompt, answer)`` for the final check: the calculation lines of a candidate
    (``final_candidate``) and their last result, as ``prompts.final_check_answer`` writes it."""
    sol, _ = final_candidate(rng, problem)
    return final_check_prompt(sol), final_check_answer(sol)


def verdict(label: bool) -> str:
    return "yes" if label else "no"
