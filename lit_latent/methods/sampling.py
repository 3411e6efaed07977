"""The sampling baselines every latent method is compared with.

- ``chain_of_thought``: one greedy answer.
- ``self_consistency``: N sampled answers, majority vote.
- ``best_of_n``: N sampled answers, the one the reward scores highest.
- ``resample``: LatentSeek's control: the same reward and stopping rule, but each new
  candidate is a fresh sampled answer instead of one decoded from optimized latents.
"""

from __future__ import annotations

import math

from lit_latent.answers import extract_answer, is_equivalent
from lit_latent.config import LatentConfig
from lit_latent.data import num_choices
from lit_latent.engine import Engine
from lit_latent.records import add_candidate, choose_best
from lit_latent.rewards import Reward, majority_answer


def chain_of_thought(engine: Engine, problems: list[dict]) -> list[dict]:
    out = engine.generate(engine.encode(problems))
    return [engine.record(p, text, n) for p, text, n in zip(problems, engine.decode(out.tokens), out.new_tokens)]


def self_consistency(engine: Engine, problems: list[dict], n: int) -> list[dict]:
    """N sampled chains, majority vote on the extracted answers (ties: first seen)."""
    texts, counts = engine.sample_answers(problems, n, tag="sc")
    records = []
    for k, p in enumerate(problems):
        mine = texts[k * n : (k + 1) * n]
        answers = [extract_answer(t, num_choices(p)) for t in mine]
        vote = majority_answer(answers, num_choices(p))
        # the output shown is the first chain that voted for the winner
        chosen = next((t for t, a in zip(mine, answers) if vote is not None and a is not None and is_equivalent(vote, a, num_choices(p))), mine[0])
        rec = engine.record(p, chosen, sum(counts[k * n : (k + 1) * n]))
        rec["samples"] = [{"answer": a} for a in answers]
        records.append(rec)
    return records


def best_of_n(engine: Engine, problems: list[dict], reward: Reward, n: int) -> list[dict]:
    """N sampled chains, the one the reward scores highest (ties: first)."""
    texts, counts = engine.sample_answers(problems, n, tag="bon")
    owners = [p for p in problems for _ in range(n)]
    scores = reward.score(engine, owners, texts)
    records = []
    for k, p in enumerate(problems):
        rs = scores.rewards[k * n : (k + 1) * n]
        best = max(range(n), key=lambda j: (rs[j], -j))
        spent = sum(counts[k * n : (k + 1) * n]) + sum(scores.tokens[k * n : (k + 1) * n])
        rec = engine.record(p, texts[k * n + best], spent)
        rec["samples"] = [{"answer": extract_answer(t, num_choices(p)), "reward": r} for t, r in zip(texts[k * n : (k + 1) * n], rs)]
        rec["reward_uses_labels"] = reward.uses_labels
        records.append(rec)
    return records


def resample(engine: Engine, problems: list[dict], reward: Reward, cfg: LatentConfig) -> list[dict]:
    """Up to ``cfg.max_iterations`` fresh samples per problem until one passes ``cfg.stop_threshold``."""
    threshold = math.inf if cfg.stop_threshold is None else cfg.stop_threshold
    prompts = engine.encode(problems)
    state = engine.prompt_state(prompts)
    first = engine.generate(prompts, prompt_state=state)
    texts = engine.decode(first.tokens)
    scores = reward.score(engine, problems, texts)
    records = [engine.adaptive_record(p, texts[i], first.new_tokens[i] + scores.tokens[i], [scores.rewards[i]], reward,
                                      scores.details[i] if scores.details else None) for i, p in enumerate(problems)]
    active = [i for i in range(len(problems)) if scores.rewards[i] < threshold]
    for step in range(cfg.max_iterations):
        if not active:
            break
        gens = [engine.generator(problems[i]["id"], f"resample:{step}") for i in active]
        out = engine.generate([prompts[i] for i in active], sample=True, generators=gens, prompt_state=state and state.select(active))
        texts = engine.decode(out.tokens)
        scores = reward.score(engine, [problems[i] for i in active], texts)
        for k, i in enumerate(active):
            add_candidate(records[i], problems[i], texts[k], out.new_tokens[k] + scores.tokens[k], scores.rewards[k])
        active = [i for k, i in enumerate(active) if scores.rewards[k] < threshold]
    if cfg.answer == "best":
        for rec in records:
            choose_best(rec)
    return records
