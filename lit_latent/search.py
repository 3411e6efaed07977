"""The latent search core that LatentSeek and LatentEvolve share.

A ``LatentSearch`` holds, for a batch of problems, each problem's latents (a leaf tensor
``[L, d]`` of last-layer post-norm states) under one Adam optimizer. Problems join (``add``)
and leave (``retire``) while the others go on, so a batch can be refilled as problems finish.
It turns latents into candidates: prefixes decoded greedily (LatentSeek) or M sampled from the
latent policy (``sample_step``), finished by the model and scored by the reward. The model's
weights never change: losses go through ``lm_head`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lit_latent.latents import baseline_value, decode_latents, policy_loss, sample_latents, token_log_probs
from lit_latent.records import add_candidate, numerical_error

Prefix = tuple[int, ...]


@dataclass
class Samples:
    """One problem's M sampled candidates of a step."""

    prefixes: list[Prefix]
    texts: list[str]
    rewards: list[float]
    tokens: int
    """Tokens generated for them: answers and reward generations (0 for a prefix met before)."""
    generations: int
    """How many of them were generated and scored now (a prefix met before is reused)."""

    def best(self) -> int:
        """The highest-reward sample, the first on ties."""
        return max(range(len(self.rewards)), key=lambda j: (self.rewards[j], -j))


@dataclass
class Scored:
    """Candidates finished from prefixes and scored, one entry per row asked for."""

    texts: list[str]
    rewards: list[float]
    tokens: list[int]
    """Tokens generated for each: answer and reward generations (0 for a prefix met before)."""
    generated: list[bool]
    """Whether it was generated now (a prefix met before is reused)."""
    after: list[Optional[Tensor]]
    """With ``hidden``: the model's states behind the tokens it generated after the prefix (None for a reused one)."""
    details: list[Optional[dict]]
    """The reward's details of each (its verdicts; None for a reused one or a reward without)."""


@dataclass
class Seeking:
    """One problem's greedy search so far (``LatentSearch.greedy_step``)."""

    original: list[int]
    """The tokens a decoded prefix is compared with: the initial answer's (with reanchor, the anchor's)."""
    reward: float
    """The latest candidate's reward (at first, the initial answer's)."""
    anchor: float
    """reanchor: the reward of the candidate the latents were last anchored to."""
    steps: int = 0
    """Iterations run."""
    repeats: int = 0
    """Iterations whose candidate was tried before."""
    start: int = 0
    """The first latent optimized (edit_from)."""
    scored_end: Optional[int] = None
    """loss_tokens=scored: the last candidate's kept prefix length (None: all the latents)."""

    def counted(self, free_repeats: int) -> int:
        """Iterations that count toward K: up to ``free_repeats`` repeats do not."""
        return self.steps - min(self.repeats, free_repeats)


class LatentSearch:
    def __init__(self, engine, reward, lr: float, records: list[dict]):
        self.engine = engine
        self.reward = reward
        self.lr = lr
        self.records = records  # a problem's numerical errors are flagged in its record
        self.latents: dict[int, Tensor] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        # per problem, prefix tried -> (text, reward): with greedy continuations and a
        # deterministic reward, a prefix met again gives the same candidate, so it is reused
        # (the reference regenerates it; answers and rewards are the same either way)
        self.reuse = reward.deterministic and not engine.reference_mode
        self.tried: dict[int, dict[Prefix, tuple[str, float]]] = {}
        # per problem: its latest answers' tokens, where a regeneration's drafts are looked up (drafts.py)
        self.answers: dict[int, list[list[int]]] = {}

    @property
    def head(self) -> torch.nn.Module:
        return self.engine.lm_head

    # --- the optimized latents ----------------------------------------------------------

    def add(self, i: int, start: Tensor) -> None:
        """Problem ``i`` starts optimizing latents initialised to ``start``."""
        z = start.detach().clone().float().requires_grad_(True)
        self.latents[i] = z
        # one Adam over all problems: a problem that sits out a step keeps grad None, so Adam skips it
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam([z], lr=self.lr)
        else:
            self.optimizer.add_param_group({"params": [z]})

    def retire(self, ids: Sequence[int]) -> None:
        """These problems are done: their latents and Adam state leave the optimizer."""
        gone = [self.latents[i] for i in ids if i in self.latents]
        if not gone or self.optimizer is None:
            return
        for z in gone:
            self.optimizer.state.pop(z, None)
        self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if not any(g["params"][0] is z for z in gone)]

    def step(self, losses: dict[int, Tensor]) -> list[int]:
        """One Adam step on the latents of the problems in ``losses``; returns those still healthy.

        A non-finite loss, or latents that turn non-finite, end that problem's search: its
        latents are restored, it keeps its last good candidate, its record says what happened.
        """
        healthy = {i: loss for i, loss in losses.items() if not numerical_error(self.records[i], "loss", loss)}
        if not healthy:
            return []
        self.optimizer.zero_grad(set_to_none=True)
        torch.stack(list(healthy.values())).sum().backward()
        before = {i: self.latents[i].detach().clone() for i in healthy}
        self.optimizer.step()
        for i in healthy:
            if not bool(torch.isfinite(self.latents[i]).all()):
                with torch.no_grad():
                    self.latents[i].copy_(before[i])
                numerical_error(self.records[i], "latents", float("nan"))
        return [i for i in healthy if self.records[i]["status"] != "numerical_error"]

    def reanchor(self, i: int, kept: int, after: Tensor) -> None:
        """Problem ``i``'s latents become those of the candidate it just scored: its first
        ``kept`` latents (they decoded to the prefix that was kept) followed by the model's own
        states behind the tokens generated after it (as many as fit the latents it had, fewer
        when the candidate is shorter); Adam's moments start afresh."""
        z = self.latents[i].detach()
        anchored = torch.cat([z[:kept], after.to(z)])[: z.shape[0]]
        self.retire([i])
        self.add(i, anchored)

    def edit_start(self, edit_from: str, tokens: list[int], text: str, details, count: int) -> int:
        """The first latent to optimize: 0, or (edit_from=first_failing_line) the token where the
        line the reward's own verdicts fail starts, so the latents before it stay put."""
        flaw = self.reward.first_flaw(text, details) if edit_from == "first_failing_line" else None
        return 0 if flaw is None else min(self.engine.token_at(tokens, flaw), count - 1)

    # --- losses ---------------------------------------------------------------------------

    def decode(self, i: int) -> list[int]:
        return decode_latents(self.head, self.latents[i])

    def greedy_loss(self, i: int, advantage: float, start: int = 0, end: Optional[int] = None) -> Tensor:
        """LatentSeek: REINFORCE on the tokens the latents decode to, ``-A sum_t log p(x_t | z_t)``
        over ``start <= t < end`` (the other latents get no gradient from it)."""
        z = self.latents[i][start:end]
        tokens = torch.tensor(decode_latents(self.head, z), device=z.device)
        return policy_loss(token_log_probs(self.head, z, tokens).sum(), advantage)

    def samples_loss(self, i: int, sampled: Sequence[Prefix], rewards: Sequence[float], base: float, temperature: float) -> Tensor:
        """``-(1/M) sum_m (Q_m - base) log p(x^m | z)`` over M prefixes sampled from the latent policy."""
        z, m = self.latents[i], len(sampled)
        terms = []
        for tokens, q in zip(sampled, rewards):
            lp = token_log_probs(self.head, z[: len(tokens)], torch.tensor(tokens, device=z.device), temperature)
            terms.append(policy_loss(lp.sum(), (q - base) / m))
        return torch.stack(terms).sum()

    # --- candidates -------------------------------------------------------------------------

    def add_answer(self, i: int, tokens: list[int]) -> None:
        """An answer problem ``i`` got (the CoT, a candidate): its next regenerations look up drafts
        in the latest two."""
        self.answers[i] = [tokens] + self.answers.get(i, [])[:1]

    def remember(self, i: int, prefix: Sequence[int], text: str, reward: float) -> None:
        """A candidate whose greedy continuation of ``prefix`` is known (e.g. the CoT itself)."""
        if self.reuse:
            self.tried.setdefault(i, {})[tuple(prefix)] = (text, reward)

    def score_prefixes(self, rows: Sequence[tuple[int, Prefix]], prompts, problems, state, hidden: bool = False) -> Scored:
        """Per row (problem, prefix): the model's greedy continuation after the prefix and its
        reward. A prefix the problem met before (in this call or an earlier one) is neither
        generated nor scored again."""
        n = len(rows)
        scored = Scored([""] * n, [0.0] * n, [0] * n, [False] * n, [None] * n, [None] * n)
        fresh: list[int] = []
        source: dict[tuple[int, Prefix], int] = {}  # the row that generates each new (problem, prefix)
        for r, (i, x) in enumerate(rows):
            if self.reuse and (x in self.tried.get(i, {}) or (i, x) in source):
                continue
            fresh.append(r)
            source[(i, x)] = r
        if fresh:
            out = self.engine.generate([prompts[rows[r][0]] for r in fresh], prefixes=[list(rows[r][1]) for r in fresh],
                                       prompt_state=state and state.select([rows[r][0] for r in fresh]), return_hidden=hidden,
                                       lookup=[self.answers.get(rows[r][0], []) for r in fresh])
            for k, r in enumerate(fresh):
                self.add_answer(rows[r][0], out.tokens[k])
            fresh_texts = self.engine.decode(out.tokens)
            scores = self.reward.score(self.engine, [problems[rows[r][0]] for r in fresh], fresh_texts)
            for k, r in enumerate(fresh):
                scored.texts[r], scored.rewards[r] = fresh_texts[k], scores.rewards[k]
                scored.tokens[r] = out.new_tokens[k] + scores.tokens[k]
                scored.generated[r] = True
                scored.details[r] = scores.details[k] if scores.details else None
                if hidden:
                    scored.after[r] = out.hidden[k][len(rows[r][1]) :]
        if self.reuse:
            for r, (i, x) in enumerate(rows):
                if scored.generated[r]:
                    if math.isfinite(scored.rewards[r]):  # a non-finite reward is not kept: its problem stops
                        self.tried.setdefault(i, {})[x] = (scored.texts[r], scored.rewards[r])
                elif (i, x) in source:  # a repeat within this call
                    scored.texts[r], scored.rewards[r] = scored.texts[source[(i, x)]], scored.rewards[source[(i, x)]]
                else:  # met in an earlier call
                    scored.texts[r], scored.rewards[r] = self.tried[i][x]
        return scored

    def sample_step(self, active: Sequence[int], m: int, temperature: float, baseline: str, samplers: Sequence[torch.Generator],
                    cut: Callable[[int, list[int]], list[int]], prompts, problems, state) -> tuple[dict[int, Samples], dict[int, Tensor]]:
        """M prefixes per active problem sampled from its latent policy (``cut`` may shorten
        each), finished by the model and scored, and the policy-gradient loss of each problem
        with rewards compared to ``baseline``: ``[i1, i2] -> rows [i1 x M, i2 x M]``. A problem
        whose rewards are not finite gets no loss (its record says why)."""
        rows = [(i, tuple(cut(i, sample_latents(self.head, self.latents[i], temperature, samplers[i]))))
                for i in active for _ in range(m)]
        scored = self.score_prefixes(rows, prompts, problems, state)
        results, losses = {}, {}
        for k, i in enumerate(active):
            mine = slice(k * m, (k + 1) * m)
            q = scored.rewards[mine]
            if numerical_error(self.records[i], "reward", sum(q)):
                continue
            results[i] = Samples([x for _, x in rows[mine]], scored.texts[mine], q, sum(scored.tokens[mine]), sum(scored.generated[mine]))
            losses[i] = self.samples_loss(i, results[i].prefixes, q, baseline_value(baseline, q), temperature)
        return results, losses

    def greedy_step(self, active: Sequence[int], seeking: dict[int, Seeking], cfg, cut: Callable[[int, list[int]], list[int]],
                    prompts, problems, state) -> list[int]:
        """LatentSeek's iteration for each active problem: REINFORCE on the tokens its latents
        decode to (reward - 1: push away from them), one Adam step, then a new candidate from the
        decoded prefix (``cut`` may shorten it), scored and added to its record. ``cfg``: the
        search's ``loss_tokens``, ``reanchor`` and ``edit_from``. Returns the problems still healthy."""
        active = self.step({i: self.greedy_loss(i, seeking[i].reward - 1.0, seeking[i].start, seeking[i].scored_end) for i in active})
        rows = [(i, tuple(cut(i, self.decode(i)))) for i in active]
        scored = self.score_prefixes(rows, prompts, problems, state, hidden=cfg.reanchor)
        for k, (i, prefix) in enumerate(rows):
            r, p = scored.rewards[k], seeking[i]
            if numerical_error(self.records[i], "reward", r):
                continue  # the problem keeps its last good candidate
            p.reward = r
            p.repeats += not scored.generated[k]
            if cfg.loss_tokens == "scored":
                p.scored_end = len(prefix)
            add_candidate(self.records[i], problems[i], scored.texts[k], scored.tokens[k], r,
                          self.engine.describe_latents(self.latents[i]), int(scored.generated[k]))
            if cfg.reanchor and scored.generated[k] and r >= p.anchor:
                # reanchor: the next edit starts from this candidate, the loss covers its tokens
                p.anchor = r
                self.reanchor(i, len(prefix), scored.after[k])
                p.scored_end = None  # the anchored latents decode to the scored candidate
                p.original = self.decode(i)
                p.start = self.edit_start(cfg.edit_from, p.original, scored.texts[k], scored.details[k], len(p.original))
        return active
