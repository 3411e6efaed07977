"""The model's output head: the latent size, and the logits its own forward computes from a latent.

A latent is the last-layer state that the causal LM's forward hands to ``lm_head`` (after the
final norm, and after OPT's ``project_out``). Some families change ``lm_head``'s output before
returning it: Gemma 2/3 softcap it (``final_logit_softcapping``; RecurrentGemma's
``logits_soft_cap``, always set: 30 in its releases), Cohere multiplies it by
``logit_scale``, Granite divides it by ``logits_scaling``, HyperCLOVA X multiplies by it.
``LogitHead`` applies the same transform, so sampling and the latent policy use the
distribution the model defines (greedy is unchanged: the transforms are monotone).

Which transform a model applies is read from its config and then checked: one probe forward
per model compares ``lm_head`` plus each candidate transform with the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lit_latent.devices import input_device

_PROBED = "_lit_latent_logit_transform"  # the probe's answer, kept in the model's __dict__ (not a submodule)
SCALE_NAMES = ("logit_scale", "logits_scaling", "lm_head_multiplier")
SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap")


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap(scale * lm_head(h))``, the order every known family uses."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def latent_size(model) -> int:
    """The size of a latent: ``lm_head``'s input (OPT's ``word_embed_proj_dim`` where it projects
    out, else the hidden size). Memories, weavers and momentum transfer are sized by it."""
    head = model.get_output_embeddings()
    return int(getattr(head, "in_features", None) or head.weight.shape[-1])


def logit_transform(model) -> LogitTransform:
    """What ``model``'s forward applies after ``lm_head`` (probed once per model, then cached).

    Raises ``ValueError`` when no known transform reproduces the model's own logits."""
    found = model.__dict__.get(_PROBED)
    if found is None:
        found = _probe(model)
        model.__dict__[_PROBED] = found
    return found


def _candidates(model) -> list[LogitTransform]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    owners = (model, getattr(model, "base_model", None), config)
    cap = next((float(v) for o in owners for name in SOFTCAP_NAMES for v in [getattr(o, name, None)]
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0), None)
    scales = [1.0]
    for owner in owners:
        for name in SCALE_NAMES:
            value = getattr(owner, name, None)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
                scales += [float(value), 1.0 / float(value)]  # Granite divides by logits_scaling, HyperCLOVA X multiplies
    caps = [cap, None] if cap else [None]
    # the configured transform first: a model whose transform is near the identity still gets it
    out = [LogitTransform(s, c) for c in caps for s in scales[1:] + scales[:1]]
    return list(dict.fromkeys(out))


@torch.no_grad()
def _probe(model) -> LogitTransform:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (lm_head)")
    vocab = head.weight.shape[0]
    ids = (torch.arange(3, 9, device=input_device(model)) % vocab)[None]
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    want = model(input_ids=ids, use_cache=False).logits.float()
    raw = head(hidden).to(want.device)  # under a device map the model's own logits come back to the input's device
    tol = 1e-4 if raw.dtype == torch.float32 else 2e-2
    for transform in _candidates(model):
        got = transform(raw).float()
        if got.shape == want.shape and torch.allclose(got, want, atol=tol * (1 + float(want.abs().max())), rtol=tol):
            return transform
    raise ValueError("its logits are not lm_head(last hidden state) under any transform lit_latent knows "
                     f"(softcapping by {' or '.join(SOFTCAP_NAMES)}, scaling by {', '.join(SCALE_NAMES)})")


class LogitHead:
    """``latents -> logits`` as the model's forward computes them; use it wherever ``lm_head`` was
    used (``weight`` is ``lm_head``'s, for its dtype). Not an ``nn.Module``: it owns no weights,
    so holding one never adds parameters to a module's state."""

    def __init__(self, model):
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.transform = logit_transform(model)

    @property
    def weight(self) -> Tensor:
        return self.lm_head.weight

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.transform(self.lm_head(hidden))


def output_logits(model, hidden: Tensor) -> Tensor:
    """The model's logits from last-layer states ``[..., latent_size] -> [..., vocab]``."""
    return LogitHead(model)(hidden)
