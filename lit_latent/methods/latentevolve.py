"""LatentEvolve's daytime (docs/algorithms.md §2): LatentSeek-style refinement that learns
across problems.

For a batch of problems: the greedy CoT gives ``e`` (the prompt's last post-norm state) and
``z_base`` (its first L' latents); the latent weaver (trained at night) maps ``z_base`` to a
better start, and momentum transfer from the top-k remembered neighbours adds their edits
``z*_j - z_base_j`` weighted by softmax(cos(e, e_j)); then up to K refinement steps of policy
gradient with M sampled outputs, stopping after ``patience`` steps without a better mean
reward (with ``evolve.stop_threshold``, also at the first step a sample passes); the answer
comes from z*. Each record carries ``_archive`` (e, z_base, z*, mean reward), which
``callbacks.memory`` archives when the mean reward reaches tau; nights (weaver training on
the memory) are that callback's too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lit_latent.config import EvolveConfig
from lit_latent.engine import Engine
from lit_latent.kvcache import encode_prompts
from lit_latent.latents import decode_latents, keep_through_first_change, latent_count, momentum_init
from lit_latent.records import add_candidate, judge
from lit_latent.rewards import Reward
from lit_latent.search import LatentSearch


def latent_evolve(engine: Engine, problems: list[dict], reward: Reward, cfg: EvolveConfig,
                  memory=None, weaver: Optional[torch.nn.Module] = None) -> list[dict]:
    m = cfg.samples
    # 1. e (the prompt's final post-norm state) and z_base (first L' latents of the greedy CoT)
    prompts = engine.encode(problems)
    state = encode_prompts(engine.model, prompts, engine.pad_id)
    cached = None if engine.reference_mode else state  # candidates reuse the prompts' cache
    first = engine.generate(prompts, return_hidden=True, prompt_state=cached)
    texts = engine.decode(first.tokens)
    records = [engine.adaptive_record(p, texts[i], first.new_tokens[i], [], reward) for i, p in enumerate(problems)]
    e = state.last.float()
    z_base = [h[: cfg.latent_count].detach().float() for h in first.hidden]
    # evolve.stop_threshold: a CoT the reward already passes is kept as it is (LatentSeek's rule)
    passed: set[int] = set()
    if cfg.stop_threshold is not None:
        cot = reward.score(engine, problems, texts)
        for i, rec in enumerate(records):
            rec["tokens"] += cot.tokens[i]
            rec["cot_reward"] = cot.rewards[i]
        passed = {i for i, q in enumerate(cot.rewards) if q >= cfg.stop_threshold}
    # answers shorter than L' cannot be compared with the memory: they stay greedy CoT
    usable = [i for i, z in enumerate(z_base) if z.shape[0] == cfg.latent_count and i not in passed]

    # 2-4. weaver, retrieval, momentum transfer
    search = LatentSearch(engine, reward, cfg.lr, records)
    starts = dict(zip(usable, starting_latents(e, z_base, usable, records, cfg, memory, weaver)))
    for i, z0 in starts.items():
        # evolve.rho: the answer's later latents are refined too, from the CoT's own
        refined = latent_count(len(first.tokens[i]), cfg.rho, len(first.tokens[i])) if cfg.rho else 0
        search.add(i, torch.cat([z0, first.hidden[i][cfg.latent_count : refined].float()]))
    samplers = [engine.generator(p["id"], "evolve") for p in problems]
    # evolve.regenerate_after_first_change: a prefix ends at its first token that differs from the CoT's
    original = {i: first.tokens[i][: len(search.latents[i])] for i in usable}

    def cut(i: int, prefix: list[int]) -> list[int]:
        return keep_through_first_change(prefix, original[i]) if cfg.regenerate_after_first_change else prefix

    # 5. refine: M sampled outputs per step, stop after `patience` steps without a better mean reward
    # or (evolve.stop_threshold) once a sample passes
    progress = {i: Progress(search.latents[i].detach().clone(), (records[i].get("cot_reward", float("-inf")), None)) for i in usable}
    active = list(usable)
    for step in range(cfg.max_steps):
        if not active:
            break
        results, losses = search.sample_step(active, m, cfg.sample_temperature, cfg.baseline, samplers, cut,
                                             prompts, problems, cached)
        for i, s in results.items():
            # the step's candidate, as LatentSeek's: its best sample (reward: the M samples' mean)
            mean, top = sum(s.rewards) / m, s.best()
            add_candidate(records[i], problems[i], s.texts[top], s.tokens, mean, generations=s.generations)
            records[i]["candidates"][-1]["best_reward"] = s.rewards[top]
            progress[i].update(mean, s.rewards[top], s.texts[top], search.latents[i])
        # evolve.stop_threshold: a problem stops once one of its samples passes, as LatentSeek does
        passed = {i for i in results if cfg.stop_threshold is not None and progress[i].best_sample[0] >= cfg.stop_threshold}
        active = [i for i in search.step({i: loss for i, loss in losses.items() if i not in passed})
                  if progress[i].stale < cfg.patience]

    if not usable:
        return records
    # 6. the answer: greedy from z*, the last step's latents (answer=best: the best step's), or
    # (answer=sample) the best sampled output itself
    chosen = {i: progress[i].chosen(cfg.answer, search.latents[i]) if records[i]["rewards"] else (search.latents[i], 0.0) for i in usable}
    if cfg.answer == "sample":
        final_texts = [records[i]["initial_output"] if progress[i].best_sample[1] is None else progress[i].best_sample[1] for i in usable]
        new_tokens = [0] * len(usable)
    else:
        prefixes = [cut(i, decode_latents(engine.lm_head, chosen[i][0])) for i in usable]
        out = engine.generate([prompts[i] for i in usable], prefixes=prefixes, prompt_state=cached and cached.select(usable))
        final_texts, new_tokens = engine.decode(out.tokens), out.new_tokens
    for k, i in enumerate(usable):
        z_star, score = chosen[i]
        answer, correct = judge(problems[i], final_texts[k])
        records[i].update(output=final_texts[k], final_answer=answer, correct=correct, final_mean_reward=score)
        records[i]["tokens"] += new_tokens[k]
        records[i].update(engine.describe_latents(z_star))
        # 7. what the memory callback archives (when final_mean_reward >= tau): the memory's L' latents
        remembered = z_star[: cfg.latent_count].detach()
        if cfg.archive == "own_edit":  # without what the start inherited (weaver, transfer)
            remembered = z_base[i] + (remembered - starts[i])
        records[i]["_archive"] = {"e": e[i].detach().cpu(), "z_base": z_base[i].cpu(),
                                  "z_star": remembered.cpu(), "score": score}
    return records


@dataclass
class Progress:
    """One problem's refinement so far."""

    best_latents: torch.Tensor
    """The latents whose M samples scored the best mean reward (before that step's update)."""
    best_sample: tuple[float, Optional[str]]
    """The highest-reward output sampled so far, (reward, text); the scored CoT starts it."""
    best_mean: float = float("-inf")
    last_mean: float = 0.0
    stale: int = 0
    """Steps since the mean reward last improved."""

    def update(self, mean: float, top_reward: float, top_text: str, latents: torch.Tensor) -> None:
        self.last_mean = mean
        if top_reward > self.best_sample[0]:
            self.best_sample = (top_reward, top_text)
        if mean > self.best_mean:
            self.best_mean, self.stale, self.best_latents = mean, 0, latents.detach().clone()
        else:
            self.stale += 1

    def chosen(self, rule: str, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """z* and its mean reward: the last step's (answer=last) or the best step's."""
        return (latents, self.last_mean) if rule == "last" else (self.best_latents, self.best_mean)


def starting_latents(e, z_base, usable, records, cfg: EvolveConfig, memory, weaver) -> list[torch.Tensor]:
    """z_0 of each usable problem: the weaver's map of its z_base (identity before the first
    night), plus the momentum transfer from its remembered neighbours (none while the memory
    is empty); the neighbours' ids go into the record."""
    if not usable:
        return []
    zb = torch.stack([z_base[i] for i in usable])
    with torch.no_grad():
        woven = weaver(e[usable], zb).float() if weaver is not None else zb
    # a problem met again (a rerun stream) must not retrieve its own entry
    found = memory.search(e[usable], cfg.top_k, exclude_ids=[[records[i]["id"]] for i in usable]) if memory is not None and len(memory) else None
    starts = []
    for k, i in enumerate(usable):
        z0 = woven[k]
        if found is not None:
            nb = found[k]
            z0 = momentum_init(z0, nb.e, e[i], nb.z_star, nb.z_base)
            records[i]["neighbours"] = list(nb.ids)
        starts.append(z0)
    return starts
