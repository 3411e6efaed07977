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

from lit_latent.config import LatentConfig
from lit_latent.engine import Engine
from lit_latent.latents import keep_through_first_change, latent_count
from lit_latent.records import add_candidate, choose_best
from lit_latent.rewards import Reward
from lit_latent.search import LatentSearch, Seeking


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
                search.add_answer(i, first.tokens[k])
                p = seeking[i] = Seeking(original=first.tokens[k][:count], reward=scores.rewards[k], anchor=scores.rewards[k])
                if first.finished[k]:  # else a continuation of its prefix gets max_new_tokens more
                    search.remember(i, p.original, texts[k], scores.rewards[k])
                if count and p.reward < threshold:
                    search.add(i, first.hidden[k][:count])
                    p.start = search.edit_start(cfg.edit_from, first.tokens[k], texts[k], scores.details[k] if scores.details else None, count)
                    active.append(i)
        if not active:
            continue
        stepped = list(active)
        for i in active:
            seeking[i].steps += 1
        if cfg.samples == 1:
            # 3-5. REINFORCE on the tokens the latents decode to, then a new candidate (search.greedy_step)
            active = search.greedy_step(active, seeking, cfg, cut, prompts, problems, state)
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
