"""Final-answer extraction and equivalence checking (docs/algorithms.md §4).

Answers are taken from the last ``\\boxed{...}`` (fallback: the last number, or the last
choice letter for multiple choice) and compared with the gold answer by mathematical
equivalence through ``math-verify``, never by string equality alone. Scoring must never
crash a run, so every math-verify failure counts as "not equivalent".
"""

from __future__ import annotations

import math
import re
import string
import threading
from collections.abc import Sequence

import torch
from math_verify import parse, verify
from torchmetrics import Metric

from lit_latent.boxed import extract_boxed

# Seconds per math-verify parse/compare on the main thread; a pred like `2^{2^{100}}`
# would otherwise hang sympy for good.
MATH_VERIFY_TIMEOUT_S = 5

# Thousands-comma numbers first so `1,600` is one match, then decimals/fractions/integers.
# The minus sign only counts when not directly after a digit: `3-5` gives `5`, not `-5`.
_NUMBER_RE = re.compile(
    r"(?:(?<![\d)])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# "answer is (B)", "Answer: C", "**Answer:** D"; the letter itself must be upper case so
# that "the answer is a number" does not read as choice A.
_ANSWER_LETTER_RE = re.compile(r"(?i:answer)[\s:*]*(?:is\b)?[\s:*]*\(?([A-Z])\)?(?![A-Za-z])")
_PAREN_LETTER_RE = re.compile(r"\(([A-Z])\)")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def extract_answer(text: str | None, choices: int = 0) -> str | None:
    """The final answer of a completion, or None when it gives none.

    Math (``choices == 0``): the last box's content, else the last number in the text
    (thousands commas dropped: ``1,600`` -> ``1600``). Multiple choice (``choices > 0``):
    a letter among the first ``choices`` capitals, from the box, else from the last
    ``answer is (B)`` / ``Answer: C`` phrase, else from the last ``(B)``.
    """
    if not text:
        return None
    boxed = extract_boxed(text)
    if choices > 0:
        letters = string.ascii_uppercase[:choices]
        if boxed is not None and (letter := _letter_in(boxed, letters)):
            return letter
        for pattern in (_ANSWER_LETTER_RE, _PAREN_LETTER_RE):
            found = [m for m in pattern.findall(text) if m in letters]
            if found:
                return found[-1]
        return None
    if boxed is not None and boxed.strip():
        return boxed.strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _letter_in(content: str, letters: str) -> str | None:
    """First standalone choice letter in a box's content, e.g. ``\\text{(B)}`` -> ``B``."""
    bare = _choice_letter(content)
    if len(bare) == 1 and bare in letters:
        return bare
    for m in re.finditer(r"(?<![A-Za-z\\])([A-Z])(?![A-Za-z])", _TEXT_RE.sub(r"\1", content)):
        if m.group(1) in letters:
            return m.group(1)
    return None


def _choice_letter(s: str) -> str:
    """``(b).`` / ``\\text{B}`` / `` B `` -> ``B``: the form letters are compared in."""
    return _TEXT_RE.sub(r"\1", s).strip().strip("().:$ ").upper()


def is_equivalent(gold: str, pred: str | None, choices: int = 0) -> bool:
    """Whether ``pred`` answers the same as ``gold``; False on None or on any error.

    Multiple choice compares letters. Math goes through math-verify with gold first, since
    ``verify`` is asymmetric (e.g. gold ``x=2`` lets pred ``2`` match). Equal normalised
    strings skip math-verify. Its SIGALRM timeouts are used only on the main thread; off it
    (a thread pool, a background writer) they are off, since ``signal.alarm`` raises there.
    """
    if pred is None:
        return False
    if choices > 0:
        letter = _choice_letter(pred)
        return len(letter) == 1 and letter == _choice_letter(gold)
    gold_n, pred_n = _normalise(gold), _normalise(pred)
    if not gold_n or not pred_n:
        return False
    if gold_n == pred_n:
        return True
    gold_int, pred_int = _as_integer(gold_n), _as_integer(pred_n)
    if gold_int is not None and pred_int is not None:
        return gold_int == pred_int  # what math-verify says of two integers, a thousand times faster
    return math_equal(gold, pred)


_INTEGER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _as_integer(s: str) -> int | None:
    """``-1,234`` -> -1234; None for anything that is not a plain integer."""
    return int(s.replace(",", "")) if _INTEGER_RE.fullmatch(s) else None


def math_equal(gold: str, pred: str) -> bool:
    """math-verify alone, without the string fast path (so tests can exercise it)."""
    seconds = _timeout_seconds()
    try:
        gold_parsed = parse(_wrap(gold), parsing_timeout=seconds)
        pred_parsed = parse(_wrap(pred), parsing_timeout=seconds)
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))
    except Exception:  # noqa: BLE001 - a scorer must never stop a run
        return False


def _timeout_seconds() -> int | None:
    """math-verify's SIGALRM timeout where signals work (main thread), else None.

    Off the main thread ``signal.alarm`` raises, so there the check runs unguarded.
    """
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _strip_answer(s: str) -> str:
    """Drop what surrounds an answer but is not part of it: spaces, ``$...$``, a final dot."""
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and not s.endswith("\\$"):
        s = s.strip("$").strip()
    return s.rstrip(".").strip()


def _normalise(s: str) -> str:
    """Cheap canonical form for the fast path; equal forms must mean equal answers."""
    s = _strip_answer(s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\s+", "", s)
    # only a whole-string number loses its commas: `(1,234)` is a pair, not 1234
    return s.replace(",", "") if _THOUSANDS_RE.match(s) else s


def _wrap(s: str) -> str:
    """Box an answer so math-verify's LaTeX extractor reads plain numbers and LaTeX alike."""
    return f"\\boxed{{{_strip_answer(s)}}}"


class AnswerAccuracy(Metric):
    """Fraction of correct answers, summed (not averaged) across DDP ranks.

    Counts are kept rather than a running mean so that ``interval`` can give a Wilson
    confidence interval for the same numbers the accuracy comes from.
    """

    full_state_update = False
    higher_is_better = True

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: bool | Sequence[bool] | torch.Tensor) -> None:
        """Add one flag or a batch of flags (True = answer judged equivalent)."""
        flags = torch.as_tensor(correct, dtype=torch.bool, device=self.device).flatten()
        self.correct += flags.sum()
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        """Accuracy in [0, 1]; 0 before any update rather than NaN."""
        return self.correct.float() / self.total.clamp(min=1)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson interval of the accuracy over all ranks."""
        with self.sync_context():
            k, n = int(self.correct), int(self.total)
        return wilson_interval(k, n, z)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (z=1.96: 95%).

    Preferred over the normal approximation because benchmarks are small (AIME: 30) and
    accuracies sit near 0 or 1, where ``p ± z·sqrt(p(1-p)/n)`` leaves [0, 1] or collapses.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"Need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
