"""Token sampling in the decoding loop (lit_latent.generation._pick): temperature, top-p, seeding."""

from __future__ import annotations

import pytest
import torch

from lit_latent.generation import _pick

# token probabilities in a shuffled order, so that the nucleus must be mapped back to vocabulary ids
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
LOGITS = PROBS.log()


def draws(logits: torch.Tensor, n: int, temperature: float, top_p: float, seed: int = 0) -> torch.Tensor:
    """n tokens sampled from one row of logits, one seeded generator drawing them all."""
    g = torch.Generator().manual_seed(seed)
    return _pick(logits.expand(n, -1), temperature, top_p, [g] * n)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (0.3, {1}),  # 0.5 >= 0.3 already: the first token alone
        (0.5, {1}),  # mass 0.5 reaches 0.5
        (0.7, {1, 3}),  # 0.5 < 0.7 <= 0.8
        (0.8, {1, 3}),
        (0.9, {1, 3, 0}),  # 0.8 < 0.9 <= 0.95
        (0.99, {1, 3, 0, 2}),
    ],
)
def test_top_p_samples_only_the_nucleus_with_renormalised_frequencies(top_p, nucleus):
    tokens = draws(LOGITS, 4000, 1.0, top_p)
    assert set(tokens.tolist()) == nucleus
    kept = torch.tensor(sorted(nucleus))
    expected = torch.zeros(4).index_put((kept,), PROBS[kept] / PROBS[kept].sum())
    assert (frequencies(tokens, 4) - expected).abs().max() < 0.03


def test_the_first_token_is_always_kept():
    # a tiny top_p and a near-flat distribution: the most likely token only
    logits = torch.tensor([0.0, 0.01, 0.0, -0.01, 0.0])
    assert set(draws(logits, 500, 1.0, 1e-6).tolist()) == {1}
    assert set(draws(LOGITS, 500, 1.0, 1e-6).tolist()) == {1}  # (generation.top_p must be > 0)


def test_top_p_1_samples_every_token_at_its_probability():
    tokens = draws(LOGITS, 8000, 1.0, 1.0)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    assert (frequencies(tokens, 4) - PROBS).abs().max() < 0.02


def test_temperature_scales_the_logits_before_sampling():
    tokens = draws(LOGITS, 8000, 2.0, 1.0)
    assert (frequencies(tokens, 4) - torch.softmax(LOGITS / 2.0, -1)).abs().max() < 0.02


def test_temperature_0_is_the_argmax():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_pick(logits, 0.0, 1.0, None), logits.argmax(-1))
    assert torch.equal(_pick(logits, 0.0, 0.5, [torch.Generator().manual_seed(i) for i in range(6)]), logits.argmax(-1))


def test_a_row_s_sample_depends_on_its_own_generator_only():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    batch = _pick(logits, 1.0, 0.9, [torch.Generator().manual_seed(10 + i) for i in range(5)])
    for i in range(5):
        alone = _pick(logits[i : i + 1], 1.0, 0.9, [torch.Generator().manual_seed(10 + i)])
        assert alone.item() == batch[i].item()
    again = _pick(logits, 1.0, 0.9, [torch.Generator().manual_seed(10 + i) for i in range(5)])
    assert torch.equal(again, batch)


def test_unseeded_sampling_also_respects_the_nucleus():
    torch.manual_seed(0)
    tokens = _pick(LOGITS.expand(3000, -1), 1.0, 0.7, None)
    assert set(tokens.tolist()) == {1, 3}
