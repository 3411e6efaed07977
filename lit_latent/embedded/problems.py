"""Seeded, deterministic arithmetic word problems with worked solutions.

A problem has 2-5 steps. Each step of its solution is one line ``a op b = c`` with
``op`` in ``+ - × ÷`` and whole-number results below 1000, and the solution ends with
``The answer is \\boxed{N}.``, e.g.::

    4 × 12 = 48
    48 - 9 = 39
    The answer is \\boxed{39}.

Five template families (one person's collection, two people compared, shopping, a
workplace's output, savings) with varied wording. Difficulty grows with the step count:
more steps bring larger starting numbers and operands.

The held-out split is a fixed list (``heldout_problems``); the training stream
(``train_problems``) skips any problem whose text is in it, so the splits are disjoint by
problem text.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Iterator, Optional

HELDOUT_SEED = 20240611
MAX_VALUE = 999
OPS = ("+", "-", "×", "÷")

NAMES = [
    ("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
    ("Emma", "she", "her"), ("Omar", "he", "his"), ("Zoe", "she", "her"), ("Ravi", "he", "his"),
    ("Lena", "she", "her"), ("Tom", "he", "his"), ("Sara", "she", "her"), ("Ben", "he", "his"),
    ("Nina", "she", "her"), ("Leo", "he", "his"), ("Ivy", "she", "her"), ("Sam", "he", "his"),
    ("Rosa", "she", "her"), ("Jack", "he", "his"), ("Kim", "she", "her"), ("Hugo", "he", "his"),
    ("Aisha", "she", "her"), ("Max", "he", "his"), ("Chloe", "she", "her"), ("Ali", "he", "his"),
]
OBJECTS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "stamps",
    "shells", "coins", "beads", "toy cars", "flowers", "candies", "rocks", "balloons",
    "eggs", "buttons", "comics", "crayons",
]
ITEMS = ["notebooks", "pens", "tickets", "plants", "shirts", "mugs", "games", "lamps", "bags", "hats"]
EXTRAS = ["a pen", "a snack", "a bag", "a card", "a ribbon", "a toy", "a drink", "a map"]
PLACES = [
    ("bakery", "bakes", "loaves"), ("factory", "builds", "chairs"), ("farm", "picks", "melons"),
    ("workshop", "makes", "toys"), ("printer", "prints", "posters"), ("kitchen", "cooks", "pies"),
]
FRIEND_WORDS = ["friends", "cousins", "classmates", "neighbors"]

_NUM = re.compile(r"\d+")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    return a // b


def _pick_op(rng: random.Random, v: int, steps: int, cap: int, allowed=OPS) -> tuple[str, int]:
    """A random feasible operation on ``v`` with operand size growing with ``steps``."""
    add_max = 10 + 15 * steps
    choices = []
    if "+" in allowed and v + 2 <= cap:
        choices.append("+")
    if "-" in allowed and v >= 4:
        choices.append("-")
    if "×" in allowed and 2 <= v and v * 2 <= cap:
        choices.append("×")
    divisors = [d for d in range(2, 10) if v % d == 0 and v // d >= 2]
    if "÷" in allowed and divisors:
        choices.append("÷")
    if not choices:
        return "+", 1
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(2, min(add_max, cap - v))
    if op == "-":
        return op, rng.randint(1, min(add_max, v - 2))
    if op == "×":
        return op, rng.randint(2, min(9, cap // v))
    return op, rng.choice(divisors)


def _start_max(steps: int) -> int:
    return 15 + 25 * (steps - 1)


def _chain(rng, v, n, steps, phrases, ctx, lines, cap=MAX_VALUE) -> tuple[list[str], int]:
    sentences = []
    for _ in range(n):
        op, b = _pick_op(rng, v, steps, cap)
        c = _op(v, op, b)
        sentences.append(_cap(rng.choice(phrases[op]).format(b=b, **ctx)))
        lines.append((v, op, b, c))
        v = c
    return sentences, v


PERSON_PHRASES = {
    "+": ["{pr} buys {b} more {obj}.", "{pr} finds {b} more {obj}.", "a friend gives {pos_obj} {b} more {obj}.",
          "then {pr} gets {b} more.", "{name} wins {b} more {obj} at a fair.", "{pr} collects another {b} {obj}."],
    "-": ["{pr} gives {b} {obj} to a friend.", "{pr} loses {b} of them.", "then {name} sells {b} {obj}.",
          "{pr} uses {b} of them.", "{b} of the {obj} get lost.", "{name} trades away {b} {obj}."],
    "×": ["then {pr} ends up with {b} times as many {obj} as before.", "{pos} collection grows to {b} times its size.",
          "{name} makes the pile {b} times bigger."],
    "÷": ["{pr} splits them equally into {b} boxes and keeps one box.",
          "{pr} shares them equally among {b} {friends} and keeps one share.",
          "{name} divides them into {b} equal groups and keeps one group."],
}
MONEY_PHRASES = {
    "+": ["{pr} also pays {b} dollars for {extra}.", "shipping adds {b} dollars.", "{pr} adds a tip of {b} dollars.",
          "a fee of {b} dollars is added."],
    "-": ["{pr} uses a coupon worth {b} dollars.", "the shop gives {pos_obj} a discount of {b} dollars.",
          "{pr} returns something and gets {b} dollars back."],
    "×": ["then {pr} places the same order {b} times in total.", "the bill ends up {b} times as large."],
    "÷": ["{name} splits the bill equally among {b} people and pays one share.",
          "the cost is shared equally by {b} {friends}, and {name} pays one part."],
}
PLACE_PHRASES = {
    "+": ["then {b} more {obj} are delivered.", "the next shift adds {b} more {obj}.", "{b} extra {obj} are found."],
    "-": ["{b} {obj} are damaged and thrown away.", "{b} of them are sold.", "then {b} {obj} are given away."],
    "×": ["the next week the {place} has {b} times as many {obj}.", "the stock grows to {b} times that number."],
    "÷": ["they are packed equally into {b} crates and one crate is kept.",
          "the {obj} are split equally among {b} shops and one shop's share is kept."],
}
SAVINGS_PHRASES = {
    "+": ["{pr} gets {b} dollars as a gift.", "{pr} earns {b} more dollars.", "{name} adds {b} dollars."],
    "-": ["{pr} spends {b} dollars on {extra}.", "{pr} pays {b} dollars for a book.", "{name} takes out {b} dollars."],
    "×": ["then {pos} savings grow to {b} times that amount.", "{pos} money becomes {b} times as much."],
    "÷": ["{pr} splits the money equally into {b} envelopes and keeps one envelope.",
          "{name} shares it equally with {b} {friends} in all and keeps one share."],
}


def _person(rng, exclude: Optional[str] = None):
    while True:
        name, pr, pos = rng.choice(NAMES)
        if name != exclude:
            return name, pr, pos


def _ctx(rng, name, pr, pos, **extra):
    ctx = dict(name=name, pr=pr, pos=pos, pos_obj="him" if pr == "he" else "her",
               friends=rng.choice(FRIEND_WORDS), extra=rng.choice(EXTRAS))
    ctx.update(extra)
    return ctx


def _collection(rng, steps):
    name, pr, pos = _person(rng)
    obj = rng.choice(OBJECTS)
    ctx = _ctx(rng, name, pr, pos, obj=obj)
    lines = []
    if rng.random() < 0.4:
        a, b = rng.randint(2, 9), rng.randint(3, min(40, _start_max(steps)))
        container = rng.choice(["boxes", "bags", "jars", "packs"])
        text = [f"{name} has {a} {container} of {obj}. Each one holds {b} {obj}."]
        lines.append((a, "×", b, a * b))
        v, n = a * b, steps - 1
    else:
        v = rng.randint(5, _start_max(steps))
        text = [rng.choice([f"{name} has {v} {obj}.", f"{name} starts with {v} {obj}.",
                            f"At first {name} owns {v} {obj}."])]
        n = steps
    more, v = _chain(rng, v, n, steps, PERSON_PHRASES, ctx, lines)
    q = rng.choice([f"How many {obj} does {name} have now?", f"How many {obj} does {name} end up with?",
                    f"How many {obj} are left with {name}?"])
    return " ".join(text + more + [q]), lines


def _two_people(rng, steps):
    name_a, _, _ = _person(rng)
    name_b, pr, pos = _person(rng, exclude=name_a)
    obj = rng.choice(OBJECTS)
    ctx = _ctx(rng, name_b, pr, pos, obj=obj)
    a = rng.randint(4, _start_max(steps))
    op, k = _pick_op(rng, a, steps, 400)
    b = _op(a, op, k)
    rel = {"+": f"{k} more {obj} than {name_a}", "-": f"{k} fewer {obj} than {name_a}",
           "×": f"{k} times as many {obj} as {name_a}",
           "÷": f"as many {obj} as {name_a} divided by {k}"}[op]
    text = [f"{name_a} has {a} {obj}.", f"{name_b} has {rel}."]
    lines = [(a, op, k, b)]
    more, b = _chain(rng, b, steps - 2, steps, PERSON_PHRASES, ctx, lines, cap=MAX_VALUE - a)
    lines.append((a, "+", b, a + b))
    q = rng.choice([f"How many {obj} do {name_a} and {name_b} have together?",
                    f"How many {obj} do the two of them have in total?"])
    return " ".join(text + more + [q]), lines


def _shopping(rng, steps):
    name, pr, pos = _person(rng)
    item = rng.choice(ITEMS)
    ctx = _ctx(rng, name, pr, pos)
    a, price = rng.randint(2, 9), rng.randint(2, min(60, _start_max(steps)))
    text = [rng.choice([f"{name} buys {a} {item} for {price} dollars each.",
                        f"{name} orders {a} {item}. Each one costs {price} dollars."])]
    lines = [(a, "×", price, a * price)]
    more, _ = _chain(rng, a * price, steps - 1, steps, MONEY_PHRASES, ctx, lines)
    q = rng.choice([f"How many dollars does {name} pay?", f"How much does {name} pay, in dollars?"])
    return " ".join(text + more + [q]), lines


def _place(rng, steps):
    place, verb, obj = rng.choice(PLACES)
    ctx = _ctx(rng, "the " + place, "it", "its", obj=obj, place=place)
    a, h = rng.randint(3, min(60, _start_max(steps))), rng.randint(2, 9)
    text = [rng.choice([f"A {place} {verb} {a} {obj} every hour for {h} hours.",
                        f"Every hour a {place} {verb} {a} {obj}. It works for {h} hours."])]
    lines = [(a, "×", h, a * h)]
    more, _ = _chain(rng, a * h, steps - 1, steps, PLACE_PHRASES, ctx, lines)
    q = rng.choice([f"How many {obj} are there at the end?", f"How many {obj} does the {place} have in the end?"])
    return " ".join(text + more + [q]), lines


def _savings(rng, steps):
    name, pr, pos = _person(rng)
    ctx = _ctx(rng, name, pr, pos)
    a, w = rng.randint(3, min(50, _start_max(steps))), rng.randint(2, 9)
    text = [rng.choice([f"{name} saves {a} dollars each week for {w} weeks.",
                        f"For {w} weeks, {name} puts {a} dollars a week into a jar."])]
    lines = [(a, "×", w, a * w)]
    more, _ = _chain(rng, a * w, steps - 1, steps, SAVINGS_PHRASES, ctx, lines)
    q = rng.choice([f"How many dollars does {name} have in the end?", f"How much money does {name} have now, in dollars?"])
    return " ".join(text + more + [q]), lines


FAMILIES = (_collection, _two_people, _shopping, _place, _savings)


def format_solution(lines: Iterable[tuple], answer) -> str:
    body = [f"{a} {op} {b} = {c}" for a, op, b, c in lines]
    return "\n".join(body + [f"The answer is \\boxed{{{answer}}}."])


def make_problem(rng: random.Random, steps: Optional[int] = None, pid: str = "") -> dict:
    """One problem: ``{id, problem, answer, solution, steps}``; ``answer`` is a string."""
    steps = steps if steps is not None else rng.randint(2, 5)
    if not 2 <= steps <= 5:
        raise ValueError(f"steps must be 2..5, got {steps}")
    text, lines = rng.choice(FAMILIES)(rng, steps)
    answer = lines[-1][3]
    return {"id": pid, "problem": text, "answer": str(answer),
            "solution": format_solution(lines, answer), "steps": steps}


def heldout_problems(n: int = 1000, seed: int = HELDOUT_SEED) -> list[dict]:
    """The fixed held-out split: step counts cycle 2,3,4,5 and texts are unique."""
    out, seen, i = [], set(), 0
    while len(out) < n:
        rng = random.Random(f"heldout-{seed}-{i}")
        p = make_problem(rng, steps=2 + len(out) % 4, pid=f"emb-{len(out):04d}")
        i += 1
        if p["problem"] not in seen:
            seen.add(p["problem"])
            out.append(p)
    return out


def train_problems(seed: int, exclude: Iterable[str] = ()) -> Iterator[dict]:
    """An endless seeded stream of training problems whose texts are not in ``exclude``."""
    excluded = set(exclude)
    rng = random.Random(f"train-{seed}")
    i = 0
    while True:
        p = make_problem(rng, pid=f"train-{seed}-{i}")
        i += 1
        if p["problem"] not in excluded:
            yield p


def numbers_in(text: str) -> list[int]:
    return [int(m) for m in _NUM.findall(text)]
