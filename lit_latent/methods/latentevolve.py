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

With ``evolve.samples=1`` the refinement is LatentSeek's greedy search instead
(``greedy_day``): one candidate per step, optionally edited from the reward's first failing
line and re-anchored at each candidate that scores at least as well (``evolve.edit_from``,
``evolve.reanchor``), from the same start z_0. There ``evolve.archive=answer`` archives the
latents behind the answer chosen, and ``evolve.recall`` lets a problem met again start from it
(its own prompt again, or reworded with the same numbers: ``recalled_entry``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lit_latent.config import EvolveConfig
from lit_latent.engine import Engine
from lit_latent.kvcache import encode_prompts
from lit_latent.latents import decode_latents, keep_through_first_change, latent_count, momentum_init
from lit_latent.memory import Neighbours, problem_keys
from lit_latent.records import add_candidate, choose_best, judge
from lit_latent.rewards import Reward
from lit_latent.search import LatentSearch, Seeking


def latent_evolve(engine: Engine, problems: list[dict], reward: Reward, cfg: EvolveConfig,
                  memory=None, weaver: Optional[torch.nn.Module] = None) -> list[dict]:
    if cfg.samples == 1:
        return greedy_day(engine, problems, reward, cfg, memory, weaver)
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
    found = neighbours(memory, e, problems, cfg.top_k)
    starts = dict(zip(usable, starting_latents(e, z_base, usable, records, found, weaver)))
    for i, z0 in starts.items():
        # evolve.rho: the answer's later latents are refined too, from the CoT's own
        refined = latent_count(len(first.tokens[i]), cfg.rho, len(first.tokens[i])) if cfg.rho else 0
        search.add(i, torch.cat([z0, first.hidden[i][cfg.latent_count : refined].float()]))
        search.add_answer(i, first.tokens[i])
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


def neighbours(memory, e: torch.Tensor, problems: list[dict], k: int):
    """Each problem's top-k remembered entries (None while the memory is empty); a problem met
    again under its own id (a rerun stream) does not retrieve its own entry."""
    if memory is None or not len(memory):
        return None
    return memory.search(e, k, exclude_ids=[[p["id"]] for p in problems])


def starting_latents(e, z_base, usable, records, found, weaver) -> list[torch.Tensor]:
    """z_0 of each usable problem: the weaver's map of its z_base (identity before the first
    night), plus the momentum transfer from its remembered neighbours ``found`` (None while the
    memory is empty); the neighbours' ids go into the record."""
    if not usable:
        return []
    zb = torch.stack([z_base[i] for i in usable])
    with torch.no_grad():
        woven = weaver(e[usable], zb).float() if weaver is not None else zb
    starts = []
    for k, i in enumerate(usable):
        z0 = woven[k]
        if found is not None:
            nb = found[i]
            z0 = momentum_init(z0, nb.e, e[i], nb.z_star, nb.z_base)
            records[i]["neighbours"] = list(nb.ids)
        starts.append(z0)
    return starts


@dataclass
class Recalled:
    """A remembered answer a problem starts from."""

    id: str
    similarity: float
    answer: torch.Tensor  # [L, d]: the latents behind the remembered answer (they decode to it)
    z_base: torch.Tensor
    spent: int
    """The iterations the remembered search spent, counted against K: its own prompt again only (the
    search is deterministic and would run again as it ran); a reworded problem has a whole K."""


def recalled_entry(nb: Neighbours, keys: tuple[int, int], min_similarity: float, passing: float) -> Optional[Recalled]:
    """The retrieved entry that is this problem met again, if any (docs/algorithms.md §2): one of its
    own prompt, whatever its search scored; else one reworded with the same numbers in the same
    order, at least ``min_similarity`` (cosine of e) and whose answer passed (reward >= ``passing``):
    a failed answer is a poor anchor for a search of its own."""
    with_answer = [j for j in range(len(nb.ids)) if nb.answers and len(nb.answers[j]) and nb.keys]
    prompt_key, numbers_key = keys
    same = next((j for j in with_answer if nb.keys[j][0] == prompt_key), None)
    if same is not None:
        return Recalled(nb.ids[same], float(nb.similarity[same]), nb.answers[same], nb.z_base[same], nb.iterations[same])
    reworded = next((j for j in with_answer if numbers_key and nb.keys[j][1] == numbers_key
                     and float(nb.similarity[j]) >= min_similarity and nb.scores[j] >= passing), None)
    if reworded is None:
        return None
    return Recalled(nb.ids[reworded], float(nb.similarity[reworded]), nb.answers[reworded], nb.z_base[reworded], 0)


def greedy_day(engine: Engine, problems: list[dict], reward: Reward, cfg: EvolveConfig, memory, weaver) -> list[dict]:
    """The daytime with LatentSeek's greedy search (evolve.samples=1), from LatentEvolve's start."""
    n, count_of = len(problems), cfg.latent_count
    threshold = math.inf if cfg.stop_threshold is None else cfg.stop_threshold
    prompts = engine.encode(problems)
    state = encode_prompts(engine.model, prompts, engine.pad_id)
    cached = None if engine.reference_mode else state
    e = state.last.float()
    keys = [problem_keys(prompts[i], p["problem"]) for i, p in enumerate(problems)]
    found = neighbours(memory, e, problems, cfg.top_k)
    # 1. evolve.recall: a problem met again (recalled_entry) starts from the remembered answer: its
    # latents' prefix, finished by the model, is the initial answer
    recalled = {} if cfg.recall is None else {i: r for i, nb in enumerate(found or [])
                                              if (r := recalled_entry(nb, keys[i], cfg.recall, threshold)) is not None}
    prefixes = [decode_latents(engine.lm_head, recalled[i].answer) if i in recalled else [] for i in range(n)]
    # 2. the others' initial answer: the greedy CoT, with e and z_base; every initial answer is scored
    first = engine.generate(prompts, prefixes=prefixes, return_hidden=True, prompt_state=cached)
    texts = engine.decode(first.tokens)
    scores = reward.score(engine, problems, texts)
    details = [scores.details[i] if scores.details else None for i in range(n)]
    records = [engine.adaptive_record(p, texts[i], first.new_tokens[i] + scores.tokens[i], [scores.rewards[i]], reward, details[i])
               for i, p in enumerate(problems)]
    for i, nb in enumerate(found or []):
        records[i]["neighbours"] = list(nb.ids)
    for i, r in recalled.items():
        records[i].update(recalled=r.id, recall_similarity=r.similarity)
    # a recalled problem's own CoT was not generated: its z_base is the remembered one's
    z_base = [recalled[i].z_base.float() if i in recalled else first.hidden[i][:count_of].detach().float() for i in range(n)]
    # answers shorter than L' cannot be compared with the memory: they search without a transferred start
    usable = [i for i in range(n) if z_base[i].shape[0] == count_of and i not in recalled]

    # 3. the latents to search: a recalled problem's are the remembered answer's (they decode to its
    # prefix); the others' are z_0 (weaver, momentum transfer) followed by the CoT's later latents
    search = LatentSearch(engine, reward, cfg.lr, records)
    starts = dict(zip(usable, starting_latents(e, z_base, usable, records, found, weaver)))
    seeking: dict[int, Seeking] = {}
    behind: dict[int, list[torch.Tensor]] = {}  # per problem, the latents behind its initial answer and each candidate
    for i in range(n):
        size = len(prefixes[i]) if i in recalled else (latent_count(len(first.tokens[i]), cfg.rho, len(first.tokens[i])) if cfg.rho
                                                      else min(count_of, len(first.tokens[i])))
        z = recalled[i].answer.float() if i in recalled else first.hidden[i][:size].float()
        behind[i] = [z.detach().clone()]
        if not size or scores.rewards[i] >= threshold:
            continue
        spent = recalled[i].spent if i in recalled else 0
        seeking[i] = Seeking(original=first.tokens[i][:size], reward=scores.rewards[i], anchor=scores.rewards[i], steps=spent)
        if seeking[i].steps >= cfg.max_steps:
            continue
        search.add(i, torch.cat([starts[i], z[count_of:]]) if i in starts else z)
        search.add_answer(i, first.tokens[i])
        seeking[i].start = search.edit_start(cfg.edit_from, first.tokens[i], texts[i], details[i], size)
        if first.finished[i]:
            search.remember(i, seeking[i].original, texts[i], scores.rewards[i])

    def cut(i: int, prefix: list[int]) -> list[int]:
        # evolve.regenerate_after_first_change: the model rewrites what follows the first edit
        return keep_through_first_change(prefix, seeking[i].original) if cfg.regenerate_after_first_change else prefix

    # 4. search: LatentSeek's iteration (search.greedy_step) until the reward passes or K iterations
    active = [i for i in seeking if i in search.latents]
    while active:
        for i in active:
            seeking[i].steps += 1
        stepped, had = list(active), {i: len(records[i]["candidates"]) for i in active}
        active = search.greedy_step(active, seeking, cfg, cut, prompts, problems, cached)
        for i in stepped:  # the latents that decoded (with reanchor: that now decode to) the new candidate
            if len(records[i]["candidates"]) > had[i]:
                behind[i].append(search.latents[i].detach().clone())
        active = [i for i in active if seeking[i].reward < threshold and seeking[i].steps < cfg.max_steps]
        search.retire([i for i in stepped if i not in active])

    # 5. the answer (answer=best: the highest-reward candidate, the initial answer included), and
    # what the memory callback archives when its reward reaches tau
    for i, rec in enumerate(records):
        if cfg.answer == "best":
            choose_best(rec)
        chosen = rec.get("chosen_candidate", len(rec["candidates"]))
        if z_base[i].shape[0] != count_of or chosen >= len(behind[i]):
            continue  # too short for the memory, or its search stopped on a numerical error
        latents = behind[i][chosen]
        if cfg.archive == "answer":  # the latents behind the answer, kept whole; z* = their first L'
            z_star = latents[:count_of] if len(latents) >= count_of else z_base[i]
        else:  # the paper's z*: the search's last latents (own_edit: less what the start inherited)
            z_star = search.latents[i][:count_of].detach().float() if i in search.latents else z_base[i]
            if cfg.archive == "own_edit" and i in starts:
                z_star = z_base[i] + (z_star - starts[i])
        rec["_archive"] = {"e": e[i].detach().cpu(), "z_base": z_base[i].cpu(), "z_star": z_star.detach().cpu(),
                           "score": rec["rewards"][chosen]}
        if cfg.archive == "answer":
            rec["_archive"].update(answer=latents.cpu(), iterations=seeking[i].steps if i in seeking else 0, keys=keys[i])
    return records
