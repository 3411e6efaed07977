"""Model loading and the batched decoding loop that the latent methods need.

``generate`` returns, besides the tokens, the last-layer hidden state *after the final norm*
that produced every generated token: the latents of docs/algorithms.md, the vectors that
``lm_head`` turns into logits (``lm_head(hidden[t]).argmax() == tokens[t]`` under greedy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from lit_latent.config import ModelConfig, UserError

# the KV cache's argument and output field: transformers 5.2x renamed past_key_values to cache
# (the old name still works there, with a warning on every run, and is to go in 5.40)
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig):
    """Load a local HF causal LM and its tokenizer, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny bar per load clutters every run's output

    path = Path(cfg.path)
    if not path.is_dir():
        raise UserError(f"config key model.path: model directory not found: {cfg.path}")
    if not (path / "config.json").is_file():
        raise UserError(f"config key model.path: {cfg.path} has no config.json (not a Hugging Face model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise UserError(f"config key model.path: cannot load a tokenizer from {cfg.path}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], local_files_only=True)
    except Exception as e:
        raise UserError(f"config key model.path: cannot load a causal LM from {cfg.path}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_id(path: str | Path) -> str:
    """A stable name for a model directory: its folder name and a digest of its config.json.
    Memories and weavers record it, so that another model's are refused."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha1((path / "config.json").read_bytes()).hexdigest()[:12]
    return f"{path.resolve().name}-{digest}"


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end an answer: the generation config's (instruct models list several) and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def chat_prompt(tokenizer, user_message: str) -> str:
    """The user message wrapped in the tokenizer's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=False
        )
    return user_message + "\n"


@dataclass
class Generation:
    tokens: list[list[int]]
    """Per row: the prefix given, then the generated ids (EOS and padding removed)."""
    hidden: Optional[list[Tensor]]
    """Per row ``[len(tokens), d]``: the post-norm last-layer state that produced each token."""
    new_tokens: list[int]
    """Per row: tokens the model generated (EOS included), the compute spent."""
    finished: list[bool]
    """Per row: stopped at EOS rather than at max_new_tokens."""


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long, device=device)
            mask[i, width - len(r):] = 1
    return ids, mask


def _positions(mask: Tensor) -> Tensor:
    # left padding: real tokens count 0, 1, 2, ... from their own first position
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _pick(logits: Tensor, temperature: float, top_p: float, generators: Optional[list[torch.Generator]]) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    # one generator per row: a row's samples do not depend on which rows share its batch
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


class ReservedLayer(DynamicLayer):
    """One layer's KV cache in a buffer with ``room`` positions to spare: a new position is
    written in place. transformers' ``DynamicLayer`` re-concatenates the whole cache at every
    token, a full copy per step that took a third of greedy decoding time on CPU.

    Positions below ``length`` are never written again, so layer copies that share a buffer
    (``copy.copy``) stay correct as long as their generations run one after another."""

    def __init__(self, room: int = 256):
        super().__init__()
        self.room, self.length = room, 0
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, room: int = 256) -> "ReservedLayer":
        """A layer that starts with these keys and values (copied into its buffer)."""
        layer = cls(room)
        layer.update(keys, values)
        return layer

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if self._k is None:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._k, self._v = key_states[:, :, :0], value_states[:, :, :0]
            self._resize(end + self.room)
        elif end > self._k.shape[-2]:  # out of room: double it
            self._resize(max(end, 2 * self._k.shape[-2]))
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._k is None:
            return
        _, H, capacity, D = self._k.shape
        k, v = self._k.new_empty(len(indices), H, capacity, D), self._v.new_empty(len(indices), H, capacity, D)
        # one pass over the filled part, straight into the new buffers
        torch.index_select(self.keys, 0, indices, out=k[:, :, : self.length])
        torch.index_select(self.values, 0, indices, out=v[:, :, : self.length])
        self._k, self._v = k, v
        self._set_length(self.length)

    def _resize(self, capacity: int) -> None:
        B, H, _, D = self._k.shape
        k, v = self._k.new_empty(B, H, capacity, D), self._v.new_empty(B, H, capacity, D)
        k[:, :, : self.length], v[:, :, : self.length] = self._k[:, :, : self.length], self._v[:, :, : self.length]
        self._k, self._v = k, v
        self._set_length(self.length)

    def _set_length(self, n: int) -> None:
        self.length = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


def new_cache(model, room: int):
    """An empty KV cache for ``model`` whose full-attention layers are ``ReservedLayer``s
    (other layer kinds, e.g. sliding windows, keep transformers' own)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def full_attention(cache) -> bool:
    """Every layer of ``cache`` attends to all earlier positions (no sliding window), so a
    custom attention mask built from the token mask alone is right for all of them."""
    return cache is not None and all(isinstance(layer, ReservedLayer) for layer in cache.layers)


@dataclass
class PromptState:
    """The prompts' KV cache and last hidden state, computed once and reused by every
    regeneration of the same problems (LatentSeek decodes up to K candidates per problem)."""

    cache: Any
    mask: Tensor  # [B, S] left-padded attention mask of the prompts
    last: Tensor  # [B, d] post-norm state at each prompt's last position: it predicts the first answer token

    def select(self, rows: Sequence[int]) -> "PromptState":
        """The state of ``rows`` (repeats allowed), sharing nothing mutable with ``self``."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        cache = copy.copy(self.cache)
        # layer objects are copied, then each takes its rows into a fresh buffer
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        cache.batch_select_indices(index)
        return PromptState(cache, self.mask[index], self.last[index])


@torch.no_grad()
def encode_prompts(model, prompts: Sequence[Sequence[int]], pad_id: int) -> PromptState:
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                           use_cache=True, **{CACHE: new_cache(model, room=256)})
    return PromptState(getattr(out, CACHE), mask, out.last_hidden_state[:, -1])


@torch.no_grad()
def extend_prompts(model, state: PromptState, blocks: Sequence[Sequence[int]], pad_id: int) -> tuple[PromptState, Tensor]:
    """``state`` with ``blocks[i]`` appended to row ``i``, and the block's hidden states
    ``[B, W, d]``. The blocks are left-padded as one block after the cached rows: the pads sit
    mid-sequence, masked out, and positions follow each row's own tokens. A row whose block is
    empty keeps its last state."""
    block, block_mask = _left_pad(blocks, pad_id, state.mask.device)
    mask = torch.cat([state.mask, block_mask], dim=1)
    out = model.base_model(input_ids=block, attention_mask=mask, position_ids=_positions(mask)[:, -block.shape[1]:],
                           use_cache=True, **{CACHE: state.cache})
    last = out.last_hidden_state[:, -1]
    if not all(len(b) for b in blocks):
        has_block = torch.tensor([len(b) > 0 for b in blocks], device=last.device)
        last = torch.where(has_block[:, None], last, state.last)
    return PromptState(getattr(out, CACHE), mask, last), out.last_hidden_state


@torch.no_grad()
def generate(
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
    use_cache: bool = True,
    prompt_state: Optional[PromptState] = None,
) -> Generation:
    """Batched greedy or sampled decoding of left-padded prompts, optionally after a forced prefix.

    ``prefixes[i]`` (answer tokens already chosen, e.g. decoded from optimized latents) is
    fed after ``prompts[i]`` and the model continues from it. ``prompt_state`` (from
    ``encode_prompts``, rows matching ``prompts``) skips recomputing the prompts.
    ``use_cache=False`` recomputes the whole sequence at every step: the reference
    implementation's cost profile.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    backbone = model.base_model
    lm_head = model.get_output_embeddings()
    prefixes = prefixes if prefixes is not None else [[] for _ in prompts]
    if len(prefixes) != len(prompts):
        raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts")
    batch = len(prompts)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    hidden_rows: list[list[Tensor]] = [[] for _ in range(batch)]

    if prompt_state is None or not use_cache:
        rows = [list(p) + list(x) for p, x in zip(prompts, prefixes)]
        ids, mask = _left_pad(rows, pad_id, device)
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=use_cache,
                       **{CACHE: new_cache(model, room=min(max_new_tokens, 256)) if use_cache else None})
        cache = getattr(out, CACHE) if use_cache else None
        states = out.last_hidden_state  # [B, S, d]
        if return_hidden:
            width = ids.shape[1]
            for i, prefix in enumerate(prefixes):
                # the state at position j predicts token j + 1
                if len(prefix):
                    hidden_rows[i].append(states[i, width - len(prefix) - 1 : width - 1])
        last = states[:, -1]
    else:
        if prompt_state.mask.shape[0] != batch:
            raise ValueError(f"prompt_state has {prompt_state.mask.shape[0]} rows for {batch} prompts")
        cache = copy.copy(prompt_state.cache)
        # new layer objects over the same buffers: this call writes only past the prompts, so
        # the caller's state keeps its positions and lengths
        cache.layers = [copy.copy(layer) for layer in prompt_state.cache.layers]
        mask, last = prompt_state.mask, prompt_state.last
        ids = None
        if any(len(x) for x in prefixes):
            extended, block_states = extend_prompts(model, PromptState(cache, mask, last), prefixes, pad_id)
            cache, mask, last = extended.cache, extended.mask, extended.last
            if return_hidden:
                width = block_states.shape[1]
                for i, prefix in enumerate(prefixes):
                    if len(prefix):
                        # prefix token 0 is predicted by the prompt's last state, token j by block position j - 1
                        hidden_rows[i].append(prompt_state.last[i : i + 1])
                        hidden_rows[i].append(block_states[i, width - len(prefix) : width - 1])

    # `live` maps the rows still in the batch to their original index: finished rows are
    # dropped once they are a quarter of the batch, so long answers do not carry short ones
    live = torch.arange(batch, device=device)
    generated = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    ended_at_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # per live row
    all_ids, all_mask = ids, mask  # all_ids is only needed without a cache
    steps = 0
    for step in range(max_new_tokens):
        steps = step + 1
        logits = lm_head(last).float()
        nxt = _pick(logits, temperature, top_p, generators)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if return_hidden:
            for k, i in enumerate(live.tolist()):
                hidden_rows[i].append(last[k : k + 1])
        counts[live] += (~done).long()
        is_eos = torch.isin(nxt, eos) & ~done
        ended_at_eos[live] |= is_eos
        generated[live, step] = torch.where(done | is_eos, torch.full_like(nxt, -1), nxt)
        done |= is_eos
        if bool(done.all()):
            break
        if 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero().squeeze(1)
            live, nxt, done, all_mask = live[keep], nxt[keep], done[keep], all_mask[keep]
            if generators is not None:
                generators = [generators[k] for k in keep.tolist()]
            if use_cache:
                cache.batch_select_indices(keep)
            else:
                all_ids = all_ids[keep]
        rows_now = len(live)
        all_mask = torch.cat([all_mask, torch.ones((rows_now, 1), dtype=all_mask.dtype, device=device)], dim=1)
        if use_cache:
            pos = _positions(all_mask)[:, -1:]
            # the step's mask ready-made: transformers would rebuild it from the 2D mask at every step
            step_mask = _additive(all_mask.bool()[:, None, None, :], dtype) if full_attention(cache) else all_mask
            out = backbone(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=pos, use_cache=True, **{CACHE: cache})
            cache = getattr(out, CACHE)
        else:
            all_ids = torch.cat([all_ids, nxt[:, None]], dim=1)
            out = backbone(input_ids=all_ids, attention_mask=all_mask, position_ids=_positions(all_mask), use_cache=False)
        last = out.last_hidden_state[:, -1]

    generated = generated[:, :steps].tolist()
    tokens, hidden = [], [] if return_hidden else None
    for i in range(batch):
        gen = [t for t in generated[i] if t >= 0]
        tokens.append(list(prefixes[i]) + gen)
        if return_hidden:
            row = torch.cat(hidden_rows[i], dim=0)
            hidden.append(row[: len(tokens[i])])
    return Generation(tokens=tokens, hidden=hidden, new_tokens=counts.tolist(), finished=ended_at_eos.tolist())


@torch.no_grad()
def generate_branches(
    model,
    state: PromptState,
    branches: Sequence[Sequence[Sequence[int]]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Greedy continuations of several branches after each cached row of ``state``.

    Row ``g`` holds an opening (e.g. one candidate's problem and solution) and
    ``branches[g]`` its continuations (the verification questions about it, each non-empty).
    All branches of a row are packed after the opening in one sequence, and a 4D attention
    mask lets each branch see the opening and its own tokens only: every branch is answered
    as if it were alone, while the opening's cache is neither copied nor repeated per branch.
    Returns per row and branch the generated ids (EOS removed) and the tokens generated (EOS
    included), like ``generate``.
    """
    if not full_attention(state.cache):
        raise ValueError("packed branches need plain full attention in every layer (no sliding windows)")
    device = state.mask.device
    dtype = next(model.parameters()).dtype
    B, S = state.mask.shape
    K = max(len(b) for b in branches)
    if any(len(t) == 0 for b in branches for t in b):
        raise ValueError("every branch needs at least one token of its own")
    opening_len = state.mask.sum(1)  # [B]: positions continue from each row's own opening
    T = max(sum(len(t) for t in b) for b in branches)  # the packed block's width
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    branch_of = torch.full((B, T), -1, dtype=torch.long, device=device)
    offset = torch.zeros((B, T), dtype=torch.long, device=device)
    ends = torch.zeros((B, K), dtype=torch.long, device=device)  # block index of each branch's last token
    for g, row in enumerate(branches):
        at = 0
        for k, tail in enumerate(row):
            ids[g, at : at + len(tail)] = torch.tensor(list(tail), dtype=torch.long, device=device)
            branch_of[g, at : at + len(tail)] = k
            offset[g, at : at + len(tail)] = torch.arange(len(tail), device=device)
            ends[g, k] = at + len(tail) - 1
            at += len(tail)
    exists = torch.tensor([[k < len(b) for k in range(K)] for b in branches], device=device)  # [B, K]
    tail_len = torch.tensor([[len(b[k]) if k < len(b) else 0 for k in range(K)] for b in branches], device=device)

    opening = state.mask.bool()[:, None, None, :]  # every query sees its row's opening (so none sees nothing)
    # the block: a token sees the earlier tokens of its own branch
    index = torch.arange(T, device=device)
    same = (branch_of[:, :, None] == branch_of[:, None, :]) & (branch_of[:, None, :] >= 0)
    causal = index[None, :, None] >= index[None, None, :]
    sees = torch.cat([opening.expand(B, 1, T, S), (same & causal)[:, None]], dim=-1)
    cache = copy.copy(state.cache)
    cache.layers = [copy.copy(layer) for layer in state.cache.layers]  # write past the opening only
    out = model.base_model(input_ids=ids, attention_mask=_additive(sees, dtype),
                           position_ids=opening_len[:, None] + offset, use_cache=True, **{CACHE: cache})
    last = out.last_hidden_state.gather(1, ends[:, :, None].expand(B, K, out.last_hidden_state.shape[-1]))
    lm_head = model.get_output_embeddings()
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    done = ~exists  # rows with fewer branches fill the missing ones with finished dummies
    generated = torch.full((B, K, max_new_tokens), -1, dtype=torch.long, device=device)
    counts = torch.zeros((B, K), dtype=torch.long, device=device)
    k_index = torch.arange(K, device=device)
    own_block = branch_of[:, None, :] == k_index[None, :, None]  # [B, K, T]
    gen_branch = torch.zeros(0, dtype=torch.long, device=device)  # branch of each generated key
    gen_real = torch.zeros((B, 0), dtype=torch.bool, device=device)  # fed while its branch was running
    for step in range(max_new_tokens):
        nxt = lm_head(last).float().argmax(-1)  # [B, K]
        counts += (~done).long()
        is_eos = torch.isin(nxt, eos) & ~done
        generated[:, :, step] = torch.where(done | is_eos, torch.full_like(nxt, -1), nxt)
        done = done | is_eos
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        # one new token per branch: it sees the opening, its branch's block and its branch's generated tokens
        gen_branch = torch.cat([gen_branch, k_index])
        gen_real = torch.cat([gen_real, ~done], dim=-1)
        own_gen = (gen_branch[None, None, :] == k_index[None, :, None]) & gen_real[:, None, :]
        step_sees = torch.cat([opening[:, 0].expand(B, K, S), own_block, own_gen], dim=-1)[:, None]
        out = model.base_model(input_ids=torch.where(done, torch.full_like(nxt, pad_id), nxt),
                               attention_mask=_additive(step_sees, dtype),
                               position_ids=opening_len[:, None] + tail_len + step, use_cache=True,
                               **{CACHE: getattr(out, CACHE)})
        last = out.last_hidden_state
    tokens = [[[t for t in generated[g, k].tolist() if t >= 0] for k in range(len(b))] for g, b in enumerate(branches)]
    return tokens, [[int(counts[g, k]) for k in range(len(b))] for g, b in enumerate(branches)]


def _additive(sees: Tensor, dtype) -> Tensor:
    """A boolean "may attend" mask as the additive float mask every attention kernel takes
    (transformers passes a 4D mask through unchanged)."""
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, torch.finfo(dtype).min)
