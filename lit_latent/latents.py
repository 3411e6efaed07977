"""Pure tensor functions of latent optimization, tested on their own.

A latent ``z_t`` is a last-layer post-norm hidden state; through the frozen head it defines
the token policy ``p(x_t | z_t) = softmax(head(z_t))``. ``head`` (the ``lm_head`` argument
below) is ``heads.LogitHead(model)``: ``lm_head`` followed by the model's own logit transform
(softcapping, scales), so the policy is the model's distribution; any callable with a
``weight`` (for the dtype) works, a bare ``lm_head`` included.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor


class Head(Protocol):
    """What the functions below need of a head: latents -> logits, and a weight for the dtype."""

    weight: Tensor

    def __call__(self, latents: Tensor) -> Tensor: ...


def latent_count(answer_length: int, rho: float, max_latents: int) -> int:
    """L = min(floor(rho * T), L_max), at least 1 for a non-empty answer."""
    if answer_length <= 0:
        return 0
    return max(1, min(math.floor(rho * answer_length), max_latents))


def token_log_probs(lm_head: Head, latents: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(tokens[t] | latents[t]) for each position: ``[L, d], [L] -> [L]``."""
    # the policy gradient stays in full precision even when generation runs under autocast
    with torch.autocast(latents.device.type, enabled=False):
        logits = lm_head(latents.to(lm_head.weight.dtype)).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def decode_latents(lm_head: Head, latents: Tensor) -> list[int]:
    """The tokens the latents currently decode to: ``argmax lm_head(z_t)``."""
    # outside autocast: it caches its cast of a leaf that requires grad until the context
    # ends, so latents updated in place would go on decoding to their first tokens
    with torch.no_grad(), torch.autocast(latents.device.type, enabled=False):
        return lm_head(latents.to(lm_head.weight.dtype)).argmax(-1).tolist()


def sample_latents(lm_head: Head, latents: Tensor, temperature: float, generator: torch.Generator) -> list[int]:
    """A token sequence sampled from the latent policy (one token per latent)."""
    with torch.no_grad(), torch.autocast(latents.device.type, enabled=False):  # see decode_latents
        probs = torch.softmax(lm_head(latents.to(lm_head.weight.dtype)).float() / temperature, dim=-1)
        # the generator's device decides the draws: lm_head may run elsewhere under a device map
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).tolist()


def policy_loss(log_prob_sum: Tensor, advantage: float) -> Tensor:
    """REINFORCE: ``-A * sum_t log p(x_t | z_t)``; minimizing it ascends the expected reward."""
    return -advantage * log_prob_sum


def baseline_value(kind: str, rewards: Sequence[float]) -> float:
    """``b`` in the advantage ``Q_m - b`` of M sampled outputs (``config.BASELINES``): their mean
    reward, 0 (the papers' plain Q) or 1 (LatentSeek's ``reward - 1``)."""
    if kind == "mean":
        return sum(rewards) / len(rewards)
    return {"none": 0.0, "one": 1.0}[kind]


def keep_through_first_change(decoded: Sequence[int], original: Sequence[int]) -> list[int]:
    """Cut a decoded prefix after its first token that differs from ``original``.

    Later prefix tokens were decoded from latents that still encode the old chain; keeping
    them makes chains arithmetically incoherent, so the model regenerates from there.
    Unchanged prefixes are kept whole.
    """
    for t, (new, old) in enumerate(zip(decoded, original)):
        if new != old:
            return list(decoded[: t + 1])
    return list(decoded)


def momentum_init(
    z_base: Tensor, neighbour_e: Tensor, query_e: Tensor, neighbour_z_star: Tensor, neighbour_z_base: Tensor
) -> Tensor:
    """LatentEvolve's momentum transfer: ``z_base + sum_j softmax_j(cos(e, e_j)) (z*_j - z_base_j)``.

    Shapes: ``z_base [L, d]``, ``neighbour_e [k, D]``, ``query_e [D]``, ``neighbour_z_* [k, L, d]``.
    """
    if neighbour_e.shape[0] == 0:
        return z_base.clone()
    cos = torch.nn.functional.cosine_similarity(neighbour_e.float(), query_e.float()[None], dim=-1)
    alpha = torch.softmax(cos, dim=0)
    shift = (alpha[:, None, None] * (neighbour_z_star.float() - neighbour_z_base.float())).sum(0)
    return z_base.float() + shift


def finite(x: Optional[Tensor]) -> bool:
    return x is None or bool(torch.isfinite(x).all())
