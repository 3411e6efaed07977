"""Rewards: score candidate answers in [0, 1].

A reward is a plain object with ``score(engine, problems, completions)``; the adaptation
module is given one and every method that needs it calls it. Rewards that ask the model
(self-verification, majority vote) generate through the ``Engine``.

Scale: every reward is in [0, 1], 1 best. LatentSeek's [-1, 0] scale is ``reward - 1``
(its stop threshold -0.2 is our 0.8); LatentEvolve's Q is already in [0, 1].

A user's own reward: subclass ``Reward``, implement ``score``, and run with
``reward.kind=custom reward.class_path=my_pkg.rewards.MyReward reward.kwargs.x=1``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from lit_latent.answers import extract_answer, is_equivalent
from lit_latent.config import RewardConfig, UserError, scheme_weights
from lit_latent.data import num_choices
from lit_latent.prompts import (
    calculation_lines,
    FINAL_CHECK_TOKENS,
    final_check_prompt,
    holistic_check_prompt,
    is_answer_line,
    RECOMPUTE_TOKENS,
    parse_final_check,
    parse_recomputed,
    parse_verdict,
    recompute_question,
    step_check_prompt,
)


@dataclass
class Scores:
    rewards: list[float]
    """One reward in [0, 1] per completion."""
    tokens: list[int]
    """Tokens generated to score each completion (compute accounting)."""
    details: list[dict[str, Any]] = field(default_factory=list)
    """Optional per-completion detail, e.g. the verdict of each check."""


class Reward:
    """Base class of rewards. ``score`` gets the engine (to generate with the model), the
    problems (dicts with id, problem, answer, choices) and one completion text per problem."""

    uses_labels: bool = False
    deterministic: bool = False
    """The same problem and completion always get the same reward. LatentSeek's fast path then
    reuses a candidate's text and reward when updated latents decode to a prefix the problem
    has already tried (the greedy continuation would be the same), instead of regenerating and
    re-scoring it. A reward that samples must leave this False."""

    def score(self, engine, problems: Sequence[dict], completions: Sequence[str]) -> Scores:
        raise NotImplementedError

    def first_flaw(self, completion: str, details: Optional[dict]) -> Optional[int]:
        """Where ``completion`` first goes wrong by this reward's own verdicts (``details``, as
        its ``score`` gave them): the character offset of that line, or None when the reward
        cannot tell (``latent.edit_from=first_failing_line`` then edits from the start)."""
        return None

    def forget(self, problem_ids: Sequence[str]) -> None:
        """These problems are finished: drop anything kept for them (``callbacks.rewards``)."""


# --- verifier: the gold answer (the paper's "perfect verifier") -----------------------------


def verifier_reward(problem: dict, completion: str) -> float:
    choices = num_choices(problem)
    return 1.0 if is_equivalent(problem["answer"], extract_answer(completion, choices), choices) else 0.0


class VerifierReward(Reward):
    """1 if the extracted answer equals the gold answer, else 0. Uses labels."""

    uses_labels = True
    deterministic = True

    def score(self, engine, problems, completions):
        return Scores([verifier_reward(p, c) for p, c in zip(problems, completions)], [0] * len(problems))


# --- self: the model verifies its own answer ------------------------------------------------

# schemes whose calculation check asks about each line, and fail lines it cannot ask about
LINE_SCHEMES = ("steps", "recompute")


Judge = Callable[[str], Optional[bool]]
"""The verdict a check's generated text gives: True, False, or None when it is not in the
form the question asks for (callers count None as a failed check)."""


def recompute_judge(op: str, claimed: int) -> Judge:
    return lambda text: parse_recomputed(text, op) == claimed


def final_judge(solution: str) -> Judge:
    return lambda text: parse_final_check(text, solution)


def check_prompts(scheme: str, problem: str, solution: str, criteria: Sequence[str]) -> list[tuple[str, str, Judge]]:
    """(criterion, user message, judge) triples that judge one solution; the judge reads the
    verdict from the model's answer: a yes/no word, or a number the model worked out that must
    equal the one the solution claims.

    The ``steps`` scheme asks the calculation check once per calculation line ("is this line
    right?"), and the answer check as "what is the last line's result?", passed when the model's
    number equals the boxed answer (``prompts.final_check_prompt``) -- what a small model can
    judge. The ``recompute`` scheme asks the model to redo each line instead, column by column
    (``prompts.recompute_question``), and compares in code. In both a solution with no
    calculation line fails its calculation check.
    """
    triples = []
    for crit in criteria:
        if scheme == "steps" and crit == "calculation":
            triples += [(crit, step_check_prompt(line), parse_verdict) for line in calculation_lines(solution)]
        elif scheme == "recompute" and crit == "calculation":
            questions = [recompute_question(line) for line in calculation_lines(solution)]
            triples += [(crit, msg, recompute_judge(op, claimed)) for msg, op, claimed in filter(None, questions)]
        elif scheme in LINE_SCHEMES and crit == "answer":
            triples.append((crit, final_check_prompt(solution), final_judge(solution)))
        else:
            triples.append((crit, holistic_check_prompt(crit, problem, solution), parse_verdict))
    return triples


def solution_lines(solution: str, scheme: str = "steps") -> list[tuple[int, str]]:
    """For the line-by-line schemes, each non-blank line of a solution as ``(character offset,
    kind)``: ``checked`` (a calculation ``a op b = c`` the scheme asks about, in the order its
    verdicts come; for ``recompute``: one whole-number calculation), ``answer`` (the closing
    sentence) or ``unchecked``. No single-line question fits an unchecked line (a latent edit
    often leaves ``31 ×  = 9``), so each counts as a failed calculation check instead of being
    skipped."""
    lines, offset = [], 0
    for line in solution.splitlines(keepends=True):
        text = line.strip()
        if text:
            checked = bool(calculation_lines(line)) and (scheme != "recompute" or recompute_question(text) is not None)
            lines.append((offset, "checked" if checked else "answer" if is_answer_line(line) else "unchecked"))
        offset += len(line)
    return lines


def unverifiable_lines(solution: str, scheme: str = "steps") -> int:
    """The unchecked lines of ``solution_lines``: each is a failed calculation check."""
    return sum(kind == "unchecked" for _, kind in solution_lines(solution, scheme))


def combine_verdicts(verdicts: dict[str, list[Optional[bool]]], weights: dict[str, float]) -> float:
    """1 - (weight of failed criteria) / (total weight). A criterion passes only if all its
    verdicts are yes; a missing or unparseable verdict (None) fails, as does a criterion
    that produced no verdict at all."""
    total = sum(weights.values())
    failed = sum(w for crit, w in weights.items() if not verdicts.get(crit) or not all(v is True for v in verdicts[crit]))
    return 1.0 - failed / total


class SelfReward(Reward):
    """The frozen model grades its own answer with the verification prompts of ``scheme``;
    all prompts of all candidates run as one batched greedy generation."""

    deterministic = True  # greedy verdicts

    def __init__(self, scheme: str = "latentseek", weights: Optional[dict[str, float]] = None, verdict_tokens: int = 4):
        self.scheme = scheme
        self.weights = scheme_weights(scheme, weights)  # checked there, as the config checks reward.weights
        self.verdict_tokens = verdict_tokens

    def score(self, engine, problems, completions):
        owners, crits, messages, judges = [], [], [], []
        for i, (p, c) in enumerate(zip(problems, completions)):
            for crit, msg, judge in check_prompts(self.scheme, p["problem"], c, list(self.weights)):
                owners.append(i)
                crits.append(crit)
                messages.append(msg)
                judges.append(judge)
        budget = self.verdict_tokens
        if self.scheme in LINE_SCHEMES:  # answers that are numbers: the final check, the recompute check
            budget = max(budget, FINAL_CHECK_TOKENS, RECOMPUTE_TOKENS if self.scheme == "recompute" else 0)
        texts, new_tokens = engine.complete(messages, max_new_tokens=budget)
        verdicts: list[dict[str, list[Optional[bool]]]] = [{} for _ in problems]
        tokens = [0] * len(problems)
        for i, crit, text, judge, n in zip(owners, crits, texts, judges, new_tokens):
            verdicts[i].setdefault(crit, []).append(judge(text))
            tokens[i] += n
        if self.scheme in LINE_SCHEMES and "calculation" in self.weights:
            for i, c in enumerate(completions):
                verdicts[i].setdefault("calculation", []).extend([False] * unverifiable_lines(c, self.scheme))
        rewards = [combine_verdicts(v, self.weights) for v in verdicts]
        details = [{c: [None if x is None else int(x) for x in vs] for c, vs in v.items()} for v in verdicts]
        return Scores(rewards, tokens, details)


    def first_flaw(self, completion: str, details: Optional[dict]) -> Optional[int]:
        """The line-by-line schemes' verdicts, walked in text order: the first calculation line
        the check failed, or that no check could be asked of (it counts as failed); else, when
        only the final check failed, the answer line."""
        if self.scheme not in LINE_SCHEMES or not details or "calculation" not in self.weights:
            return None
        asked = iter(details.get("calculation", []))  # the checked lines' verdicts come first, in order
        answer_at = None
        for offset, kind in solution_lines(completion, self.scheme):
            if kind == "unchecked" or (kind == "checked" and next(asked, 0) != 1):
                return offset
            if kind == "answer" and answer_at is None:
                answer_at = offset
        return answer_at if details.get("answer") and not all(v == 1 for v in details["answer"]) else None


# --- majority: TTRL-style agreement with the majority answer ---------------------------------


def majority_answer(answers: Sequence[Optional[str]], choices: int = 0) -> Optional[str]:
    """The most frequent answer up to equivalence; ties go to the answer seen first."""
    groups: list[tuple[str, int]] = []  # (representative, count) in order of first sight
    for a in answers:
        if a is None:
            continue
        for k, (rep, count) in enumerate(groups):
            if is_equivalent(rep, a, choices):
                groups[k] = (rep, count + 1)
                break
        else:
            groups.append((a, 1))
    if not groups:
        return None
    best = max(count for _, count in groups)
    return next(rep for rep, count in groups if count == best)


class MajorityReward(Reward):
    """1 if the candidate's answer agrees with the majority of N sampled answers, else 0.
    The samples are drawn once per problem and cached for its later candidates."""

    deterministic = True  # against the problem's one vote

    def __init__(self, samples: int = 8):
        self.samples = samples
        self._majority: dict[str, tuple[Optional[str], int]] = {}

    def forget(self, problem_ids):
        for pid in problem_ids:  # finished problems no longer need their vote
            self._majority.pop(pid, None)

    def score(self, engine, problems, completions):
        todo = [p for p in problems if p["id"] not in self._majority]
        if todo:
            texts, new_tokens = engine.sample_answers(todo, self.samples, tag="majority")
            for k, p in enumerate(todo):
                mine = texts[k * self.samples : (k + 1) * self.samples]
                spent = sum(new_tokens[k * self.samples : (k + 1) * self.samples])
                answers = [extract_answer(t, num_choices(p)) for t in mine]
                self._majority[p["id"]] = (majority_answer(answers, num_choices(p)), spent)
        rewards, tokens = [], []
        for p, c in zip(problems, completions):
            majority, spent = self._majority[p["id"]]
            choices = num_choices(p)
            rewards.append(1.0 if majority is not None and is_equivalent(majority, extract_answer(c, choices), choices) else 0.0)
            tokens.append(spent)
            self._majority[p["id"]] = (majority, 0)  # the vote's cost is counted once
        return Scores(rewards, tokens)


# --- confidence: how sure the model is of its own output distribution (LTPO) -----------------


def top_k_confidence(logits: Tensor, k: int = 10) -> Tensor:
    """LTPO's confidence of each distribution ``[..., vocab] -> [...]``: the mean over its k most
    likely tokens of -log p. A peaked distribution scores high (its runners-up are improbable);
    the lowest value, log k, is the mass spread evenly over k tokens."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -log_p.topk(min(k, log_p.shape[-1]), dim=-1).values.mean(-1)


def confidence_reward(score: float, k: int = 10) -> float:
    """A confidence score on the [0, 1] scale of every reward: ``1 - log(k) / score``. It is 0 at
    the lowest score (log k: k equally likely tokens) and nears 1 as the score grows without
    bound, and it is monotone, so it ranks candidates as the raw score does. On it a stop
    threshold r is a score of ``log(k) / (1 - r)`` (0.8 with k = 10: 11.5 nats)."""
    floor = math.log(k)
    return max(0.0, 1.0 - floor / score) if score > 0 else 0.0


class ConfidenceReward(Reward):
    """LTPO's confidence as a reward for any method: the model reads the problem's prompt and the
    candidate's own answer tokens in one forward pass, and the candidate scores the mean
    ``top_k_confidence`` of the distributions that predicted its tokens, mapped to [0, 1] by
    ``confidence_reward``. Nothing is generated and no label is used."""

    deterministic = True

    def __init__(self, top_k: int = 10):
        self.top_k = top_k

    @torch.no_grad()
    def score(self, engine, problems, completions):
        from lit_latent.kvcache import _left_pad, _positions

        prompts = engine.encode(problems)
        answers = [engine.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        rewards, details = [0.0] * len(problems), [{} for _ in problems]
        for s in range(0, len(prompts), engine.chunk):
            rows = [(i, prompts[i] + answers[i]) for i in range(s, min(s + engine.chunk, len(prompts))) if answers[i]]
            if not rows:
                continue
            ids, mask = _left_pad([r for _, r in rows], engine.pad_id, engine.device)
            states = engine.model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                                             use_cache=False).last_hidden_state
            for k, (i, row) in enumerate(rows):
                # the state before answer token j predicts it: positions width - n - 1 .. width - 2
                n, width = len(answers[i]), ids.shape[1]
                score = float(top_k_confidence(engine.lm_head(states[k, width - n - 1 : width - 1]), self.top_k).mean())
                rewards[i] = confidence_reward(score, self.top_k)
                details[i] = {"confidence": score}
        return Scores(rewards, [0] * len(problems), details)


# --- construction from the config ------------------------------------------------------------


def import_class(path: str, key: str = "reward.class_path") -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise UserError(f"config key {key}: {path!r} is not a dotted import path like my_pkg.rewards.MyReward")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"config key {key}: cannot import {path}: {e}") from None


def make_reward(cfg: RewardConfig) -> Reward:
    if cfg.kind == "verifier":
        return VerifierReward()
    if cfg.kind == "self":
        return SelfReward(cfg.scheme, cfg.weights, cfg.verdict_tokens)
    if cfg.kind == "majority":
        return MajorityReward(cfg.majority_samples)
    if cfg.kind == "confidence":
        return ConfidenceReward(cfg.top_k)
    cls = import_class(cfg.class_path)
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise UserError(f"config key reward.class_path: {cfg.class_path} is not a subclass of lit_latent.rewards.Reward")
    try:
        reward = cls(**cfg.kwargs)
    except TypeError as e:
        raise UserError(f"config key reward.kwargs: {cfg.class_path}: {e}") from None
    reward.score = _named_failures(reward.score, cfg.class_path)
    return reward


def _named_failures(score, class_path: str):
    """A custom reward that raises ends the run in one line naming it and the problems scored;
    their batch is not written, so rerunning with the same run_dir resumes there."""
    import functools

    @functools.wraps(score)
    def wrapped(engine, problems, completions):
        try:
            return score(engine, problems, completions)
        except UserError:
            raise
        except Exception as e:
            ids = ", ".join(str(p.get("id")) for p in problems)
            reason = (str(e).splitlines() or [""])[0]
            raise UserError(f"config key reward.class_path: {class_path}.score raised {type(e).__name__}: {reason} "
                            f"(scoring problem {ids}); the finished problems are saved: fix the reward and rerun "
                            "with the same run_dir=... to resume") from None

    return wrapped

