"""The KV-cache machinery of decoding: reserved cache layers, cached prompts, masks.

``encode_prompts`` computes left-padded prompts' cache once; ``extend_prompts`` appends a block
to it. Decoding (``generation.generate``, and ``generation.generate_branches``, which packs
several continuations of one cached opening under a 4D attention mask) passes ready-made 4D
masks only to a model that takes them; that is probed, not assumed: ALiBi models (Bloom, Falcon with ``alibi=True``) build their bias from a 2D mask and
get one (``accepts_4d_mask``).

All of this needs a cache of keys and values, which can be cut, selected and extended position
by position. Recurrent and convolution states (Mamba, Jamba, LFM2, Falcon-H1, RecurrentGemma)
summarise the whole past in one state, updated in place, that a pad mid-sequence would change.
Whether a model's cache can be held this way is probed too (``holds_kv_cache``); where it cannot,
a prompt state keeps no cache and every generation re-runs its prompt (``rerun.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from lit_latent.devices import input_device, output_device


# the KV cache's argument and output field: transformers 5.2x renamed past_key_values to cache
# (the old name still works there, with a warning on every run, and is to go in 5.40)
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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

    @torch.compiler.disable  # perf.compile: the buffer bookkeeping runs eagerly (dynamo cannot trace the in-place re-pointing)
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
        indices = indices.to(self._k.device)  # under a device map each layer's buffers sit on its own device
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


def select_rows(cache, rows: Tensor) -> None:
    """``cache.batch_select_indices(rows)``, each layer given ``rows`` on its own device (a device
    map puts layers, and so their keys and values, on several devices)."""
    for layer in cache.layers:
        device = getattr(layer, "device", None)
        layer.batch_select_indices(rows if device is None else rows.to(device))


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


def probed_once(model, name: str, probe):
    """``probe(model)``, run once per model: the answer is kept in the model's ``__dict__`` under
    ``name`` (an attribute, not a submodule or buffer, so it never reaches a state dict)."""
    found = model.__dict__.get(name)
    if found is None:
        found = probe(model)
        model.__dict__[name] = found
    return found


_PROBED = "_lit_latent_4d_mask"  # where accepts_4d_mask's answer is kept
_HOLDS = "_lit_latent_holds_kv_cache"  # where holds_kv_cache's answer is kept


def accepts_4d_mask(model) -> bool:
    """Whether ``model`` takes a ready-made 4D additive attention mask and means by it what the
    2D mask means. Probed once per model (then cached on it): two left-padded rows are encoded,
    then a 2-token block and a 1-token step are run with the 2D mask and again with the
    equivalent 4D masks; the hidden states must agree. ALiBi models, which build their bias
    from a 2D mask, raise or disagree, and get the 2D mask at every step."""
    return probed_once(model, _PROBED, _probe_4d_mask)


@torch.no_grad()
def _probe_4d_mask(model) -> bool:
    weight = model.get_output_embeddings().weight
    vocab, dtype = weight.shape[0], next(model.parameters()).dtype
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    state = _encode_padded(model, [[t % vocab for t in p] for p in prompts], pad_id=0)

    def run(four_d: bool) -> Tensor:
        cache = copy.copy(state.cache)
        cache.layers = [copy.copy(layer) for layer in state.cache.layers]
        mask, states = state.mask, []
        for block in ([[10, 11], [12, 13]], [[14], [15]]):
            ids = torch.tensor(block, device=mask.device) % vocab
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            width, n = mask.shape[1], ids.shape[1]
            causal = torch.ones(n, width, dtype=torch.bool, device=mask.device).tril(width - n)
            attention = _additive(mask.bool()[:, None, None, :] & causal, dtype) if four_d else mask
            out = model.base_model(input_ids=ids, attention_mask=attention, position_ids=_positions(mask)[:, -n:],
                                   use_cache=True, **{CACHE: cache})
            cache = getattr(out, CACHE)
            states.append(out.last_hidden_state.float())
        return torch.cat(states, dim=1)

    want = run(four_d=False)
    try:
        got = run(four_d=True)
    except Exception:  # e.g. Bloom's build_alibi_tensor unpacking the mask as [batch, length]
        return False
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return got.shape == want.shape and torch.allclose(got, want, atol=tol * (1 + float(want.abs().max())), rtol=tol)


def holds_kv_cache(model) -> bool:
    """Whether the fast path can hold ``model``'s cache: prompts encoded once, rows selected and
    repeated, a block appended, a state reused by a later generation after an earlier one wrote
    past it. True for caches of keys and values. Probed once per model (then cached on it): a
    state is used as ``generate`` uses it, then again through ``select``, each time a block and a
    decoding step are appended; the hidden states must be those of each row run alone without a
    cache. Recurrent and convolution states raise (no ``batch_select_indices``) or disagree
    (updated in place, a shared state is overwritten by its first use)."""
    return probed_once(model, _HOLDS, _probe_kv_cache)


@torch.no_grad()
def _probe_kv_cache(model) -> bool:
    vocab = model.get_output_embeddings().weight.shape[0]
    device = input_device(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    # blocks of one length: the fast path's answers with ragged blocks (pads mid-sequence) are the
    # parity tests' business; moving a family off it is not this probe's (MPT differs there, see docs/performance.md)
    blocks = [[10, 11], [12, 13]]
    steps = [14, 15]
    tokens = lambda rows: [[t % vocab for t in r] for r in rows]  # noqa: E731
    got = []
    try:
        state = _encode_padded(model, tokens(prompts), pad_id=0)
        for order in ([0, 1], [1, 0, 1]):
            if order == [0, 1]:  # as generate uses a state: new layer objects over the same buffers
                cache = copy.copy(state.cache)
                cache.layers = [copy.copy(layer) for layer in state.cache.layers]
                start = PromptState(cache, state.mask, state.last)
            else:  # after the first use wrote past the prompts: rows repeated and swapped
                start = state.select(order)
            extended, _ = extend_prompts(model, start, tokens([blocks[i] for i in order]), pad_id=0)
            mask = torch.cat([extended.mask, torch.ones_like(extended.mask[:, :1])], dim=1)
            out = model.base_model(input_ids=torch.tensor(tokens([[steps[i]] for i in order]), device=device),
                                   attention_mask=mask, position_ids=_positions(mask)[:, -1:], use_cache=True,
                                   **{CACHE: extended.cache})
            got.append((order, torch.stack([extended.last, out.last_hidden_state[:, -1].to(extended.last.device)], dim=1).float()))
    except Exception:  # e.g. a LinearAttentionLayer has no batch_select_indices
        return False
    alone = {}
    for i in range(len(prompts)):
        row = torch.tensor(tokens([prompts[i] + blocks[i] + [steps[i]]]), device=device)
        alone[i] = model.base_model(input_ids=row, use_cache=False).last_hidden_state[0, -2:].float()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    for order, states in got:
        want = torch.stack([alone[i] for i in order])
        states = states.to(want.device)
        if states.shape != want.shape or not torch.allclose(states, want, atol=tol * (1 + float(want.abs().max())), rtol=tol):
            return False
    return True


def step_mask(model, cache, mask: Tensor) -> Tensor:
    """The attention mask for a decoding step after the 2D ``mask`` ``[B, S]``: ready-made 4D
    where every layer attends fully and the model takes it (transformers would rebuild it from
    the 2D mask at every step), else the 2D mask itself."""
    if full_attention(cache) and accepts_4d_mask(model):
        return _additive(mask.bool()[:, None, None, :], next(model.parameters()).dtype)
    return mask


@dataclass
class PromptState:
    """The prompts' KV cache and last hidden state, computed once and reused by every
    regeneration of the same problems (LatentSeek decodes up to K candidates per problem)."""

    cache: Any  # None where the model's cache cannot be held (``holds_kv_cache``)
    mask: Tensor  # [B, S] left-padded attention mask of the prompts
    last: Tensor  # [B, d] post-norm state at each prompt's last position: it predicts the first answer token

    def select(self, rows: Sequence[int]) -> "PromptState":
        """The state of ``rows`` (repeats allowed), sharing nothing mutable with ``self``."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        last = self.last[index.to(self.last.device)]  # under a device map: where the last layer runs
        if self.cache is None:  # a model whose cache is not held: generations re-run the prompts
            return PromptState(None, self.mask[index], last)
        cache = copy.copy(self.cache)
        # layer objects are copied, then each takes its rows into a fresh buffer
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        select_rows(cache, index)
        return PromptState(cache, self.mask[index], last)


@torch.no_grad()
def encode_prompts(model, prompts: Sequence[Sequence[int]], pad_id: int) -> PromptState:
    """The prompts' cache and last states; only the last states (``cache=None``) for a model whose
    cache cannot be held (``holds_kv_cache``): its generations re-run the prompts."""
    if not holds_kv_cache(model):
        ids, mask = _left_pad(prompts, pad_id, input_device(model))
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        return PromptState(None, mask, _last_state(model, out))
    return _encode_kv(model, prompts, pad_id)


# what one more forward costs, in prompt tokens: prompts are prefilled in groups of similar length
# where a group saves more padding than this (on the 2-core CPU a forward of the embedded model costs
# about as much as 40 tokens of prefill; docs/performance.md)
PREFILL_GROUP_TOKENS = 48
SHARED_OPENING_TOKENS = 8  # a common opening at least this long is prefilled once for all prompts


@torch.no_grad()
def _encode_kv(model, prompts: Sequence[Sequence[int]], pad_id: int) -> PromptState:
    """The prompts' cache, computed with little repeated or padded work: the opening all prompts
    share (the chat template's and the instruction's tokens) is prefilled once, the rest of each
    prompt after it in groups of similar length (``length_groups``), each group's rows left-padded
    to its longest. The cache holds per row the opening, pads, then the row's own tokens (pads
    mid-sequence, masked, as ``extend_prompts`` leaves them)."""
    shared = min(len(p) for p in prompts) - 1  # every row keeps a token of its own: its last state comes from it
    for p in prompts[1:]:
        shared = min(shared, common_prefix(prompts[0], p))
    shared = shared if shared >= SHARED_OPENING_TOKENS and len(prompts) > 1 else 0
    rests = [p[shared:] for p in prompts]
    groups = length_groups([len(r) for r in rests], PREFILL_GROUP_TOKENS)
    if (not shared and len(groups) == 1) or not full_attention(new_cache(model, room=0)):
        return _encode_padded(model, prompts, pad_id)
    opening = _encode_padded(model, [prompts[0][:shared]], pad_id) if shared else None
    parts = []
    for rows in groups:
        own = [rests[i] for i in rows]
        parts.append((rows, extend_prompts(model, opening.select([0] * len(rows)), own, pad_id)[0] if shared
                      else _encode_padded(model, own, pad_id)))
    # one cache of the batch's width: the opening, then each group's own part right-aligned
    _, own_mask = _left_pad(rests, pad_id, input_device(model))
    mask = torch.cat([torch.ones_like(own_mask[:, :1]).expand(-1, shared), own_mask], dim=1)
    width = mask.shape[1]
    pieces = []
    for rows, part in parts:
        filled = part.cache.layers
        own = filled[0].length - shared
        if shared:
            pieces.append((rows, 0, [(layer.keys[:, :, :shared], layer.values[:, :, :shared]) for layer in filled]))
        pieces.append((rows, width - own, [(layer.keys[:, :, shared:], layer.values[:, :, shared:]) for layer in filled]))
    last = parts[0][1].last.new_empty(len(prompts), parts[0][1].last.shape[1])
    for rows, part in parts:
        last[torch.tensor(rows, device=last.device)] = part.last
    return PromptState(cache_from_pieces(model, len(prompts), width, pieces), mask, last)


def cache_from_pieces(model, batch: int, width: int, pieces) -> Any:
    """A cache of ``batch`` rows and ``width`` positions put together from known keys and values:
    each piece ``(rows, start, layers)`` writes ``layers[l] = (keys, values)`` (``[len(rows), H, n, D]``)
    into layer ``l`` of those rows from position ``start`` on. Positions no piece writes stay zero;
    the caller's mask leaves them out."""
    layers = []
    for layer, (k0, v0) in enumerate(pieces[0][2]):
        keys = k0.new_zeros(batch, k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(batch, v0.shape[1], width, v0.shape[3])
        for rows, start, kv in pieces:
            k, v = kv[layer]
            index = torch.tensor(rows, device=keys.device)  # under a device map each layer sits on its own device
            keys[index, :, start : start + k.shape[2]], values[index, :, start : start + v.shape[2]] = k, v
        layers.append(ReservedLayer.holding(keys, values))
    cache = new_cache(model, room=256)
    cache.layers = layers
    return cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` open with alike."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_padded(model, prompts: Sequence[Sequence[int]], pad_id: int) -> PromptState:
    ids, mask = _left_pad(prompts, pad_id, input_device(model))
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                           use_cache=True, **{CACHE: new_cache(model, room=256)})
    return PromptState(getattr(out, CACHE), mask, _last_state(model, out))


def length_groups(lengths: Sequence[int], cost_per_group: int) -> list[list[int]]:
    """Row indices grouped by length: the split of the rows, sorted by length, into runs that
    costs the fewest tokens, a run costing its rows padded to its longest plus ``cost_per_group``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [None] * len(order)  # best[j]: the cost of the first j rows
    start = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last run is order[i:j], padded to the length of order[j - 1]
            cost = best[i] + (j - i) * lengths[order[j - 1]] + cost_per_group
            if best[j] is None or cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[start[j] : j])
        j = start[j]
    return groups[::-1]


@torch.no_grad()
def encode_prompt_embeddings(model, embeds: Tensor, mask: Tensor) -> PromptState:
    """``encode_prompts`` for prompts given as input embeddings ``[B, S, d]`` (left-padded, ``mask``
    ``[B, S]``), e.g. with optimized vectors in place of some tokens: ``generate`` then
    continues them as it continues token prompts."""
    out = model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                           use_cache=True, **{CACHE: new_cache(model, room=256)})
    return PromptState(getattr(out, CACHE), mask, _last_state(model, out))


@torch.no_grad()
def extend_prompts(model, state: PromptState, blocks: Sequence[Sequence[int]], pad_id: int) -> tuple[PromptState, Tensor]:
    """``state`` with ``blocks[i]`` appended to row ``i``, and the block's hidden states
    ``[B, W, d]``. The blocks are left-padded as one block after the cached rows: the pads sit
    mid-sequence, masked out, and positions follow each row's own tokens. A row whose block is
    empty keeps its last state."""
    if state.cache is None:
        raise ValueError("extend_prompts needs a held cache; this model's generations re-run their prompts")
    block, block_mask = _left_pad(blocks, pad_id, state.mask.device)
    mask = torch.cat([state.mask, block_mask], dim=1)
    out = model.base_model(input_ids=block, attention_mask=mask, position_ids=_positions(mask)[:, -block.shape[1]:],
                           use_cache=True, **{CACHE: state.cache})
    last = _last_state(model, out)
    if not all(len(b) for b in blocks):
        has_block = torch.tensor([len(b) > 0 for b in blocks], device=last.device)
        last = torch.where(has_block[:, None], last, state.last)
    return PromptState(getattr(out, CACHE), mask, last), out.last_hidden_state


def _last_state(model, out) -> Tensor:
    # a latent: it lives where lm_head runs, which a device map may put past the last layer's device
    return out.last_hidden_state[:, -1].to(output_device(model))


def _additive(sees: Tensor, dtype) -> Tensor:
    """A boolean "may attend" mask as the additive float mask every attention kernel takes
    (transformers passes a 4D mask through unchanged)."""
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, torch.finfo(dtype).min)
