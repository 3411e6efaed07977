"""Decoding for models whose cache the fast path cannot hold (``kvcache.holds_kv_cache`` is False).

Recurrent and convolution layers (Mamba, Jamba, LFM2, Falcon-H1, RecurrentGemma) keep one state
per row that summarises everything before it and is updated in place: it cannot be cut at a
position, a pad mid-sequence would move it, and a prompt's state shared by two generations
would be overwritten by the first. So here every generation re-runs its prompt and prefix in one
prefill and then decodes a token a step with transformers' own cache object, each step's inputs
made by the model's own ``prepare_inputs_for_generation`` (what ``model.generate`` feeds it: Mamba,
e.g., takes no attention mask after the prefill). No prompt state is reused, finished rows stay
in the batch (a recurrent state has no rows to cut cheaply), masks stay 2D.

Whether that stepping reproduces the model's own forward is probed once per model
(``steps_with_own_cache``); where it does not, every step recomputes the whole sequence
(``generate(use_cache=False)``): the slowest path, and right for any causal LM.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_latent import generation
from lit_latent.devices import input_device, output_device
from lit_latent.generation import Generation, generate
from lit_latent.heads import LogitHead
from lit_latent.kvcache import CACHE, _left_pad, _positions, holds_kv_cache, probed_once


@torch.no_grad()
def generate_rerunning(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Optional[list[torch.Generator]] = None,
    return_hidden: bool = False,
) -> Generation:
    """``generation.generate`` for a model whose cache is not held: same arguments and result."""
    kw = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, prefixes=prefixes,
              temperature=temperature, top_p=top_p, generators=generators, return_hidden=return_hidden)
    if not steps_with_own_cache(model):
        return generate(model, prompts, use_cache=False, **kw)
    return _decode_with_own_cache(model, prompts, pick=generation._pick, **kw)


def _forward(model, ids: Tensor, mask: Tensor, cache, first: bool) -> Tensor:
    """Last-layer states of the prefill (``first``) or of the newest token, fed as ``generate`` feeds them."""
    inputs = model.prepare_inputs_for_generation(
        ids, next_sequence_length=None if first else 1, attention_mask=mask, position_ids=_positions(mask),
        use_cache=True, is_first_iteration=first, **{CACHE: cache},
    )
    inputs.pop("logits_to_keep", None)  # the head is applied by LogitHead, to the states we keep
    return model.base_model(**inputs).last_hidden_state


class _Rows:
    """What each row of a batched decode has generated, for the decodes here, which keep finished
    rows in the batch: a finished row is fed padding and generates nothing more."""

    def __init__(self, batch: int, max_new_tokens: int, eos_ids: Sequence[int], device):
        self.eos = torch.tensor(sorted(set(eos_ids)), device=device)
        self.generated = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.ended_at_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.steps = 0

    def take(self, nxt: Tensor, pad_id: int) -> Tensor:
        """Record one step's picks ``[B]``; returns what is fed next (finished rows: padding)."""
        nxt = torch.where(self.done, torch.full_like(nxt, pad_id), nxt)
        self.counts += (~self.done).long()
        is_eos = torch.isin(nxt, self.eos) & ~self.done
        self.ended_at_eos |= is_eos
        self.generated[:, self.steps] = torch.where(self.done | is_eos, torch.full_like(nxt, -1), nxt)
        self.done |= is_eos
        self.steps += 1
        return nxt

    def tokens(self, prefixes: Sequence[Sequence[int]]) -> list[list[int]]:
        """Per row: its prefix, then what it generated (EOS and padding removed)."""
        return [list(prefix) + [t for t in row if t >= 0] for prefix, row in zip(prefixes, self.generated[:, : self.steps].tolist())]


def _decode_with_own_cache(model, prompts, *, pick, max_new_tokens, eos_ids, pad_id, prefixes, temperature, top_p,
                           generators, return_hidden) -> Generation:
    from transformers import DynamicCache

    device = input_device(model)
    head = LogitHead(model)
    prefixes = prefixes if prefixes is not None else [[] for _ in prompts]
    if len(prefixes) != len(prompts):
        raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts")
    batch = len(prompts)
    hidden_rows: list[list[Tensor]] = [[] for _ in range(batch)]

    ids, mask = _left_pad([list(p) + list(x) for p, x in zip(prompts, prefixes)], pad_id, device)
    # the model fills this object in place (RecurrentGemma does not return it)
    cache = DynamicCache(config=model.config)
    states = _forward(model, ids, mask, cache, first=True)  # [B, S, d]
    if return_hidden:
        width = ids.shape[1]
        for i, prefix in enumerate(prefixes):
            if len(prefix):  # the state at position j predicts token j + 1
                hidden_rows[i].append(states[i, width - len(prefix) - 1 : width - 1])
    last = states[:, -1]

    rows = _Rows(batch, max_new_tokens, eos_ids, device)
    for step in range(max_new_tokens):
        nxt = pick(head(last).float().to(device), temperature, top_p, generators)  # lm_head may run elsewhere
        if return_hidden:
            for i in (~rows.done).nonzero().squeeze(1).tolist():
                hidden_rows[i].append(last[i : i + 1])
        nxt = rows.take(nxt, pad_id)
        if bool(rows.done.all()) or step + 1 == max_new_tokens:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = _forward(model, ids, mask, cache, first=False)[:, -1]

    tokens = rows.tokens(prefixes)
    latent_device = output_device(model)  # latents live where lm_head runs
    hidden = [torch.cat(hidden_rows[i], dim=0)[: len(tokens[i])].to(latent_device) for i in range(batch)] if return_hidden else None
    return Generation(tokens=tokens, hidden=hidden, new_tokens=rows.counts.tolist(), finished=rows.ended_at_eos.tolist())


@torch.no_grad()
def generate_from_embeddings(model, embeds: Tensor, mask: Tensor, *, max_new_tokens: int, eos_ids: Sequence[int],
                             pad_id: int) -> Generation:
    """Greedy answers after prompts given as input embeddings ``[B, S, d]`` (left-padded, ``mask``
    ``[B, S]``; LTPO's thoughts), for a model whose cache is not held. A prompt of embeddings has no
    token ids for the model's own cache to re-run, so every step recomputes the whole sequence, the
    generated tokens appended as their input embeddings: slow, and right for any causal LM."""
    head, embed = LogitHead(model), model.get_input_embeddings()
    rows = _Rows(len(embeds), max_new_tokens, eos_ids, embeds.device)
    for _ in range(max_new_tokens):
        states = model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                                  use_cache=False).last_hidden_state
        nxt = rows.take(head(states[:, -1]).float().argmax(-1).to(embeds.device), pad_id)
        if bool(rows.done.all()):
            break
        embeds = torch.cat([embeds, embed(nxt)[:, None].to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return Generation(tokens=rows.tokens([[] for _ in embeds]), hidden=None, new_tokens=rows.counts.tolist(),
                      finished=rows.ended_at_eos.tolist())


_PROBED = "_lit_latent_steps_with_own_cache"  # where steps_with_own_cache's answer is kept


def steps_with_own_cache(model) -> bool:
    """Whether decoding with transformers' own cache, a token a step, gives the states of the
    model's forward without a cache. Probed once per model (then cached on it): two left-padded
    rows, one with a forced prefix, decode greedily; every state behind a token must equal the
    forward over that row alone."""
    return probed_once(model, _PROBED, _probe_own_cache)


@torch.no_grad()
def _probe_own_cache(model) -> bool:
    vocab = model.get_output_embeddings().weight.shape[0]
    device = input_device(model)
    prompts = [[t % vocab for t in row] for row in ([3, 4, 5, 6, 7], [8, 9])]
    prefixes = [[], [10 % vocab, 11 % vocab]]
    try:
        out = _decode_with_own_cache(model, prompts, pick=lambda logits, *_: logits.argmax(-1), max_new_tokens=4,
                                     eos_ids=[-1], pad_id=0, prefixes=prefixes, temperature=0.0, top_p=1.0,
                                     generators=None, return_hidden=True)
    except Exception:  # a model whose forward does not take transformers' cache object
        return False
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    for prompt, tokens, hidden in zip(prompts, out.tokens, out.hidden):
        row = torch.tensor([prompt + tokens], device=device)
        want = model.base_model(input_ids=row, use_cache=False).last_hidden_state[0, len(prompt) - 1 : -1].float()
        got = hidden.float().to(want.device)
        if got.shape != want.shape or not torch.allclose(got, want, atol=tol * (1 + float(want.abs().max())), rtol=tol):
            return False
    return True


def decoding_path(model) -> str:
    """Which path decodes ``model`` (both probes run once, then are cached on it): ``"kv cache"``
    (the fast path: prompt cache reused, rows selected, buffers grown in place), ``"own cache"``
    (transformers' cache object, prompt and prefix re-run per generation: recurrent and convolution
    states) or ``"recompute"`` (no cache: the whole sequence at every step)."""
    if holds_kv_cache(model):
        return "kv cache"
    return "own cache" if steps_with_own_cache(model) else "recompute"
