"""Measure the embedded model: greedy CoT accuracy, check accuracies, self-agreement.

    python -m lit_latent.embedded.evaluate                       # the shipped model, 500 held-out problems
    python -m lit_latent.embedded.evaluate --model DIR --n 200 --n-checks 200

Check accuracies are on balanced examples (half ``yes``) built from held-out problems by
``checks.check_example``. Self-agreement asks the model's checks about its *own* greedy
solutions and compares the verdicts with whether the solution is correct: what the
self-reward sees at test time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Optional, Sequence

import torch

from lit_latent.boxed import extract_boxed
from lit_latent.prompts import (
    HOLISTIC_QUESTIONS,
    calculation_lines,
    FINAL_CHECK_TOKENS,
    final_check_prompt,
    holistic_check_prompt,
    math_prompt,
    RECOMPUTE_TOKENS,
    parse_final_check,
    parse_recomputed,
    parse_verdict,
    recompute_question,
    step_check_prompt,
)
from lit_latent.embedded import HELDOUT_PATH, MODEL_DIR
from lit_latent.embedded.checks import TASKS, candidate, check_example, final_candidate, final_label, line_true, step_line


def load(model_dir=MODEL_DIR):
    """The model and its tokenizer; a directory that lacks either is a one-line ``UserError``."""
    from lit_latent.config import ModelConfig, UserError
    from lit_latent.generation import load_model

    try:
        return load_model(ModelConfig(path=str(model_dir)))
    except UserError as e:  # this command's option, not adapt.py's config key
        raise UserError(str(e).replace("config key model.path", "--model")) from None


def read_problems(path=HELDOUT_PATH, n: Optional[int] = None) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def boxed_answer(text: str) -> Optional[str]:
    found = extract_boxed(text)
    return found.strip() if found is not None else None


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 160, batch_size: int = 64) -> list[str]:
    """Greedy completions of user messages, batched by length with left padding."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    enc = [tok(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(enc)
    pad = tok.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
            mask[r, width - len(enc[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad)
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
    return out


def solve(model, tok, problems: Sequence[dict], max_new_tokens: int = 160, batch_size: int = 64) -> list[str]:
    return generate(model, tok, [math_prompt(p["problem"]) for p in problems], max_new_tokens, batch_size)


def ask(model, tok, prompts: Sequence[str], batch_size: int = 128) -> list[Optional[bool]]:
    """Verdicts parsed from the generated text only."""
    return [parse_verdict(g) for g in generate(model, tok, prompts, max_new_tokens=3, batch_size=batch_size)]


def final_check(model, tok, solutions: Sequence[str], batch_size: int = 128) -> list[Optional[bool]]:
    """The final check of each solution: the model writes its last line's result
    (``final_check_prompt``), which passes when it equals the boxed answer."""
    texts = generate(model, tok, [final_check_prompt(s) for s in solutions], max_new_tokens=FINAL_CHECK_TOKENS,
                     batch_size=batch_size)
    return [parse_final_check(t, s) for t, s in zip(texts, solutions)]


def recompute(model, tok, lines: Sequence[str], batch_size: int = 128) -> list[Optional[bool]]:
    """The recompute check of each line: the model redoes it column by column and the line
    passes when that gives back the value the line claims; None for a line no column layout
    fits."""
    questions = [recompute_question(ln) for ln in lines]
    asked = [q for q in questions if q is not None]
    texts = iter(generate(model, tok, [m for m, _, _ in asked], max_new_tokens=RECOMPUTE_TOKENS,
                           batch_size=batch_size))
    return [None if q is None else parse_recomputed(next(texts), q[1]) == q[2] for q in questions]


def cot_accuracy(model, tok, problems: Sequence[dict], **kw) -> dict:
    sols = solve(model, tok, problems, **kw)
    correct = [boxed_answer(s) == str(p["answer"]) for p, s in zip(problems, sols)]
    res = {"overall": sum(correct) / len(correct), "solutions": sols, "correct": correct}
    for k in sorted({p["steps"] for p in problems}):
        sel = [c for c, p in zip(correct, problems) if p["steps"] == k]
        res[f"steps_{k}"] = sum(sel) / len(sel)
    return res


def check_accuracies(model, tok, problems: Sequence[dict], tasks=TASKS, seed: int = 0) -> dict:
    """Balanced accuracy of each checking task (verdicts alternate yes/no)."""
    rng = random.Random(seed)
    res = {}
    for task in tasks:
        if task == "final":  # the solution, not a prompt: the check compares with its box
            ex = [final_candidate(rng, p, want=(i % 2 == 0)) for i, p in enumerate(problems)]
            got = final_check(model, tok, [s for s, _ in ex])
        else:
            ex = [check_example(rng, p, task, want=(i % 2 == 0)) for i, p in enumerate(problems)]
            got = ask(model, tok, [e[0] for e in ex])
        res[task] = sum(g == lab for g, (_, lab) in zip(got, ex)) / len(ex)
    lines = [step_line(rng, p, want=(i % 2 == 0)) for i, p in enumerate(problems)]
    got = recompute(model, tok, lines)
    res["recompute"] = sum(g is line_true(ln) for g, ln in zip(got, lines)) / len(lines)
    # the final check's real job: a boxed answer that differs from the last line's result
    wrong_box = [s for s in (candidate(rng, p, "wrong_final") for p in problems) if not final_label(s)]
    res["final_wrong_box"] = sum(g is False for g in final_check(model, tok, wrong_box)) / len(wrong_box)
    return res


def self_agreement(model, tok, problems: Sequence[dict], solutions: Sequence[str], correct: Sequence[bool]) -> dict:
    """How the model's verdicts on its own solutions line up with their correctness."""
    prompts, owner = [], []
    for i, s in enumerate(solutions):
        for ln in calculation_lines(s):
            prompts.append(step_check_prompt(ln)); owner.append(("step", i, line_true(ln)))
        for c in HOLISTIC_QUESTIONS:
            prompts.append(holistic_check_prompt(c, problems[i]["problem"], s)); owner.append((c, i, None))
    got = ask(model, tok, prompts)
    final_ok = [v is True for v in final_check(model, tok, solutions)]
    own_lines = [(i, ln) for i, s in enumerate(solutions) for ln in calculation_lines(s)]
    redone = recompute(model, tok, [ln for _, ln in own_lines])
    n = len(solutions)
    recompute_ok = [bool(calculation_lines(s)) for s in solutions]
    for (i, ln), v in zip(own_lines, redone):
        recompute_ok[i] &= v is True
    steps_ok = [True] * n
    holistic = {c: [False] * n for c in HOLISTIC_QUESTIONS}
    line_hits = []
    for (kind, i, truth), v in zip(owner, got):
        if kind == "step":
            steps_ok[i] &= v is True
            line_hits.append(v is truth)
        else:
            holistic[kind][i] = v is True
    verdicts = {"steps+final": [a and b for a, b in zip(steps_ok, final_ok)],
                "recompute+final": [a and b for a, b in zip(recompute_ok, final_ok)], **holistic,
                "latentseek (all 4)": [all(holistic[c][i] for c in ("calculation", "answer", "complete", "understood"))
                                       for i in range(n)]}
    res = {}
    for name, v in verdicts.items():
        agree = sum(a == c for a, c in zip(v, correct)) / n
        yes_right = sum(a for a, c in zip(v, correct) if c) / max(1, sum(correct))
        no_wrong = sum(not a for a, c in zip(v, correct) if not c) / max(1, n - sum(correct))
        res[name] = {"agree": agree, "yes_on_correct": yes_right, "no_on_wrong": no_wrong}
    res["own_lines_step_check"] = sum(line_hits) / max(1, len(line_hits))
    res["own_lines_true"] = sum(o[2] for o in owner if o[0] == "step") / max(1, len(line_hits))
    res["own_lines_recompute"] = sum(v is line_true(ln) for (_, ln), v in zip(own_lines, redone)) / max(1, len(own_lines))
    return res


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--heldout", default=str(HELDOUT_PATH))
    ap.add_argument("--n", type=positive_int, default=500, help="held-out problems for CoT accuracy and self-agreement")
    ap.add_argument("--n-checks", type=positive_int, default=300, help="held-out problems per checking task")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    rows = read_problems(args.heldout)
    t0 = time.time()
    cot = cot_accuracy(model, tok, rows[: args.n])
    t_cot = time.time() - t0
    print(f"\nGreedy CoT accuracy ({args.n} held-out problems, {t_cot:.0f}s)")
    print("| overall | " + " | ".join(f"{k} steps" for k in (2, 3, 4, 5)) + " |\n|---|---|---|---|---|")
    print(f"| {cot['overall']:.1%} | " + " | ".join(f"{cot.get(f'steps_{k}', float('nan')):.1%}" for k in (2, 3, 4, 5)) + " |")
    checks = check_accuracies(model, tok, rows[500:500 + args.n_checks])
    print(f"\nCheck accuracy (balanced, {args.n_checks} held-out problems each)\n| task | accuracy |\n|---|---|")
    for k, v in checks.items():
        print(f"| {k} | {v:.1%} |")
    agree = self_agreement(model, tok, rows[: args.n], cot["solutions"], cot["correct"])
    print(f"\nSelf-agreement on its own greedy solutions ({args.n} problems, {sum(cot['correct'])} correct)")
    print("| verdict | agrees with correctness | yes on correct | no on wrong |\n|---|---|---|---|")
    for k, v in agree.items():
        if isinstance(v, dict):
            print(f"| {k} | {v['agree']:.1%} | {v['yes_on_correct']:.1%} | {v['no_on_wrong']:.1%} |")
    print(f"\nStep check on its own calculation lines: {agree['own_lines_step_check']:.1%} right "
          f"({agree['own_lines_true']:.1%} of those lines are true); "
          f"recompute check on them: {agree['own_lines_recompute']:.1%} right")
    print(f"total {time.time() - t0:.0f}s")
    return {"cot": {k: v for k, v in cot.items() if k not in ("solutions", "correct")}, "checks": checks, "self": agree}


if __name__ == "__main__":
    import sys

    from lit_latent.runs import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:]))
