"""LatentSeek (docs/algorithms.md §1): per problem, policy-gradient updates of the answer's
latents, guided by a reward; the model's weights never change.

For each problem: a greedy chain of thought with its latents (the post-norm last-layer state
behind every answer token) and its reward; then, while the reward is under the threshold and
fewer than K iterations ran: one Adam step on the first ``L = min(floor(rho T), L_max)``
latents, decode them to a prefix, let the model finish the answer from it, score it.

The batch adapts together with continuous batching: at most ``perf.max_active`` problems
search at once (0: the whole batch); when one stops, the next problem of the batch takes its
slot, so long searches do not leave the batch half empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lit_latent.config import LatentConfig
from lit_latent.engine import Engine
from lit_latent.latents import keep_through_first_change, latent_count
from lit_latent.records import add_candidate, choose_best, numerical_error
from lit_latent.rewards import Reward
from lit_latent.search import LatentSearch


def latent_seek(engine: Engine, problems: list[dict], reward: Reward, cfg: LatentConfig) -> list[dict]:
    n = len(problems)
    threshold = math.inf if cfg.stop_threshold is None else cfg.stop_threshold
    width = engine.cfg.perf.max_active or n
    prompts = engine.encode(problems)
    state = engine.prompt_state(prompts)  # the prompts' cache serves every candidate
    records: list[dict] = [{} for _ in range(n)]
    search = LatentSearch(engine, reward, cfg.lr, records)
    seeking: dict[int, Seeking] = {}  # the problems that have started, by index
    samplers = [engine.generator(p["id"], "latent") for p in problems]

    def edit_start(tokens: list[int], text: str, details, count: int) -> int:
        # latent.edit_from=first_failing_line: the latents before the line the reward fails stay put
        flaw = reward.first_flaw(text, details) if cfg.edit_from == "first_failing_line" else None
        return 0 if flaw is None else min(engine.token_at(tokens, flaw), count - 1)

    def cut(i: int, prefix: list[int]) -> list[int]:
        # latent.regenerate_after_first_change: the model rewrites what follows the first edit
        return keep_through_first_change(prefix, seeking[i].original) if cfg.regenerate_after_first_change else prefix

    pending, active = list(range(n)), []
    while pending or active:
        # 1. newcomers: greedy chain of thought with its latents, and its reward
        new, pending = pending[: width - len(active)], pending[width - len(active) :]
        if new:
            first = engine.generate([prompts[i] for i in new], return_hidden=True, prompt_state=state and state.select(new))
            texts = engine.decode(first.tokens)
            scores = reward.score(engine, [problems[i] for i in new], texts)
            for k, i in enumerate(new):
                records[i] = engine.adaptive_record(problems[i], texts[k], first.new_tokens[k] + scores.tokens[k],
                                                    [scores.rewards[k]], reward, scores.details[k] if scores.details else None)
                # 2. the latents to optimize: the first L = min(floor(rho T), L_max) of the answer
                count = latent_count(len(first.tokens[k]), cfg.rho, cfg.max_latents)
                p = seeking[i] = Seeking(original=first.tokens[k][:count], reward=scores.rewards[k], anchor=scores.rewards[k])
                if first.finished[k]:  # else a continuation of its prefix gets max_new_tokens more
                    search.remember(i, p.original, texts[k], scores.rewards[k])
                if count and p.reward < threshold:
                    search.add(i, first.hidden[k][:count])
                    p.start = edit_start(first.tokens[k], texts[k], scores.details[k] if scores.details else None, count)
                    active.append(i)
        if not active:
            continue
        stepped = list(active)
        for i in active:
            seeking[i].steps += 1
        if cfg.samples == 1:
            # 3-5. REINFORCE on the tokens the latents decode to (reward - 1: push away from them), then a new candidate
            active = search.step({i: search.greedy_loss(i, seeking[i].reward - 1.0, seeking[i].start, seeking[i].scored_end)
                                  for i in active})
            rows = [(i, tuple(cut(i, search.decode(i)))) for i in active]
            scored = search.score_prefixes(rows, prompts, problems, state, hidden=cfg.reanchor)
            for k, (i, prefix) in enumerate(rows):
                r, p = scored.rewards[k], seeking[i]
                if numerical_error(records[i], "reward", r):
                    continue  # the problem keeps its last good candidate
                p.reward = r
                p.repeats += not scored.generated[k]
                if cfg.loss_tokens == "scored":
                    p.scored_end = len(prefix)
                add_candidate(records[i], problems[i], scored.texts[k], scored.tokens[k], r,
                              engine.describe_latents(search.latents[i]), int(scored.generated[k]))
                if cfg.reanchor and scored.generated[k] and r >= p.anchor:
                    # latent.reanchor: the next edit starts from this candidate, the loss covers its tokens
                    p.anchor = r
                    search.reanchor(i, len(prefix), scored.after[k])
                    p.scored_end = None  # the anchored latents decode to the scored candidate
                    p.original = search.decode(i)
                    p.start = edit_start(p.original, scored.texts[k], scored.details[k], len(p.original))
        else:
            # M sampled prefixes per problem, Q compared with latent.baseline; the best sample is the candidate
            results, losses = search.sample_step(active, cfg.samples, cfg.sample_temperature, cfg.baseline, samplers, cut,
                                                 prompts, problems, state)
            for i, s in results.items():
                best = s.best()
                seeking[i].reward = s.rewards[best]
                seeking[i].repeats += s.generations == 0
                add_candidate(records[i], problems[i], s.texts[best], s.tokens, s.rewards[best], generations=s.generations)
            active = search.step(losses)
            for i in active:  # what the updated latents now decode to
                records[i]["candidates"][-1].update(engine.describe_latents(search.latents[i]))
        # 6. a problem stops once its reward passes the threshold, or after K iterations (its slot is
        # refilled); up to latent.free_repeats iterations that only repeated a tried candidate do not count
        active = [i for i in active if seeking[i].reward < threshold and seeking[i].counted(cfg.free_repeats) < cfg.max_iterations]
        search.retire([i for i in stepped if i not in active])
    if cfg.answer == "best":
        for rec in records:
            choose_best(rec)
    return records


@dataclass
class Seeking:
    """One problem's search so far."""

    original: list[int]
    """The tokens a decoded prefix is compared with: the initial answer's (with reanchor, the anchor's)."""
    reward: float
    """The latest candidate's reward (at first, the initial answer's)."""
    anchor: float
    """latent.reanchor: the reward of the candidate the latents were last anchored to."""
    steps: int = 0
    """Iterations run."""
    repeats: int = 0
    """Iterations whose candidate was tried before."""
    start: int = 0
    """The first latent optimized (latent.edit_from)."""
    scored_end: Optional[int] = None
    """latent.loss_tokens=scored: the last candidate's kept prefix length (None: all the latents)."""

    def counted(self, free_repeats: int) -> int:
        """Iterations that count toward K: up to ``free_repeats`` repeats do not."""
        return self.steps - min(self.repeats, free_repeats)
