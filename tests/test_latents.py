"""The pure tensor functions of lit_latent/latents.py, each against a value computed by hand
or against the definition it implements."""

from __future__ import annotations

import math

import pytest
import torch

from lit_latent.latents import (
    baseline_value,
    decode_latents,
    keep_through_first_change,
    latent_count,
    momentum_init,
    policy_loss,
    sample_latents,
    token_log_probs,
)

HIDDEN, VOCAB = 8, 20


def head(seed: int = 0) -> torch.nn.Linear:
    """A tiny random frozen lm_head, as the model's is."""
    torch.manual_seed(seed)
    return torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)


def latents(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


# --- the policy gradient ---------------------------------------------------------------------------


def test_token_log_probs_is_the_log_softmax_of_the_head_at_each_position():
    lm_head, z = head(), latents()
    tokens = torch.tensor([3, 0, 19, 7, 7])
    for temperature in (1.0, 0.5):
        expected = torch.log_softmax(lm_head(z) / temperature, -1)[torch.arange(5), tokens]
        torch.testing.assert_close(token_log_probs(lm_head, z, tokens, temperature), expected)


@pytest.mark.parametrize("advantage", [1.0, -1.0, 0.0])
def test_an_adam_step_on_the_policy_loss_moves_log_p_the_advantage_s_way(advantage):
    """Minimizing ``policy_loss`` is gradient ascent on ``A * log p(sampled tokens)``: a positive
    advantage makes the sampled tokens likelier, a negative one less likely, zero leaves them."""
    lm_head = head()
    z = latents().requires_grad_(True)
    tokens = torch.tensor([3, 0, 19, 7, 7])
    optimizer = torch.optim.Adam([z], lr=0.05)
    before = token_log_probs(lm_head, z, tokens).sum()
    loss = policy_loss(before, advantage)
    assert loss.item() == pytest.approx(-advantage * before.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = token_log_probs(lm_head, z, tokens).sum().item()
    if advantage > 0:
        assert after > before.item() + 0.1
    elif advantage < 0:
        assert after < before.item() - 0.1
    else:
        assert after == pytest.approx(before.item())
    assert lm_head.weight.grad is None  # the head stays frozen: only the latents move


# --- counts and baselines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, rho, cap, expected",
    [
        (0, 0.5, 10, 0),  # nothing to optimize
        (-3, 0.5, 10, 0),
        (10, 0.25, 100, 2),  # floor(2.5), not round
        (10, 0.85, 100, 8),  # floor(8.5)
        (7, 0.5, 100, 3),  # floor(3.5); round() would give 4
        (10, 0.29, 100, 2),  # floor(2.9)
        (20, 0.85, 100, 17),
        (3, 0.2, 10, 1),  # floor(0.6) = 0, but a non-empty answer gets one latent
        (1, 0.0, 10, 1),
        (100, 0.5, 20, 20),  # max_latents caps it
        (100, 1.0, 300, 100),
    ],
)
def test_latent_count(length, rho, cap, expected):
    assert latent_count(length, rho, cap) == expected


def test_baseline_value():
    assert baseline_value("mean", [1.0, 0.0, 0.5]) == pytest.approx(0.5)
    assert baseline_value("mean", [0.25]) == pytest.approx(0.25)
    assert baseline_value("none", [1.0, 1.0]) == 0.0
    assert baseline_value("one", [0.0, 0.0]) == 1.0
    with pytest.raises(KeyError):
        baseline_value("median", [1.0])


@pytest.mark.parametrize(
    "decoded, original, expected",
    [
        ([1, 2, 9, 4, 5], [1, 2, 3, 4, 5], [1, 2, 9]),  # cut after the first changed token
        ([1, 2, 9, 8, 7], [1, 2, 3, 4, 5], [1, 2, 9]),
        ([9, 2, 3], [1, 2, 3], [9]),  # the very first token changed
        ([1, 2, 3], [1, 2, 3], [1, 2, 3]),  # unchanged: kept whole
        ([1, 2], [1, 2, 3, 4], [1, 2]),  # decoded shorter, no change: whole
        ([1, 5], [1, 2, 3, 4], [1, 5]),
        ([1, 2, 3, 7], [1, 2, 3], [1, 2, 3, 7]),  # original shorter, no change within it: whole
        ([], [1, 2], []),
    ],
)
def test_keep_through_first_change(decoded, original, expected):
    kept = keep_through_first_change(decoded, original)
    assert kept == expected and isinstance(kept, list)


# --- decoding and sampling the latents ---------------------------------------------------------------


def test_decode_latents_is_the_argmax_of_the_head():
    lm_head, z = head(), latents(12)
    assert decode_latents(lm_head, z) == lm_head(z).argmax(-1).tolist()
    assert decode_latents(lm_head, z.requires_grad_(True)) == lm_head(z).argmax(-1).tolist()


def test_decode_latents_sees_in_place_updates_under_autocast():
    """Under autocast the cast of a leaf that requires grad is cached until the context ends: a
    decode inside autocast would keep returning the latents' first tokens after the optimizer
    changed them in place."""
    lm_head, z = head(), latents(6).requires_grad_(True)
    target = lm_head.weight[torch.tensor([4, 11, 2, 17, 0, 9])]  # a latent equal to row v decodes to v (mostly)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = decode_latents(lm_head, z)
        with torch.no_grad():
            z.copy_(10 * target)
        second = decode_latents(lm_head, z)
    assert first == lm_head(latents(6)).argmax(-1).tolist()
    assert second == lm_head(10 * target).argmax(-1).tolist() and second != first


def test_sample_latents_is_seeded_and_follows_the_softmax():
    lm_head, z = head(), latents(40)
    same = [sample_latents(lm_head, z, 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0] == same[1] and len(same[0]) == 40
    assert sample_latents(lm_head, z, 1.0, torch.Generator().manual_seed(8)) != same[0]
    # one latent repeated: token frequencies approach softmax(lm_head(z) / temperature)
    one = latents(1, seed=3)
    for temperature in (1.0, 2.0):
        draws = torch.tensor(sample_latents(lm_head, one.expand(20000, HIDDEN), temperature, torch.Generator().manual_seed(0)))
        freq = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
        expected = torch.softmax(lm_head(one)[0] / temperature, -1)
        assert (freq - expected).abs().max() < 0.015


def test_sample_latents_at_temperature_near_zero_is_the_argmax():
    lm_head, z = head(), latents(30)
    assert sample_latents(lm_head, z, 1e-4, torch.Generator().manual_seed(0)) == decode_latents(lm_head, z)


# --- LatentEvolve's momentum transfer ---------------------------------------------------------------


def test_momentum_init_by_hand():
    """Query e = (1, 0); neighbours' e at cosine 1, 0 and -1 (the third twice as long: cosine, not
    dot product). softmax(1, 0, -1) = (e, 1, 1/e) / (e + 1 + 1/e) = (0.665241, 0.244728, 0.090031).
    Their shifts z* - z_base: (1, 0), (0, 2), (-3, 3), so
    z0 = z_base + (0.665241 - 3 * 0.090031, 2 * 0.244728 + 3 * 0.090031) = z_base + (0.395149, 0.759549)."""
    query_e = torch.tensor([1.0, 0.0])
    neighbour_e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    neighbour_z_base = torch.tensor([[[5.0, 5.0]], [[0.0, -1.0]], [[2.0, 2.0]]])  # [k=3, L=1, d=2]
    shifts = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[-3.0, 3.0]]])
    z_base = torch.tensor([[1.0, 2.0]])
    z0 = momentum_init(z_base, neighbour_e, query_e, neighbour_z_base + shifts, neighbour_z_base)
    torch.testing.assert_close(z0, torch.tensor([[1.395149, 2.759549]]), atol=1e-5, rtol=0)

    # two latents; one neighbour: all its weight, its shift added as is
    z_base2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z0 = momentum_init(z_base2, neighbour_e[1:2], query_e, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]))
    torch.testing.assert_close(z0, torch.tensor([[0.0, 1.0], [3.0, 4.0]]))


def test_momentum_init_without_neighbours_is_z_base():
    z_base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z0 = momentum_init(z_base, torch.zeros(0, 2), torch.tensor([1.0, 0.0]), torch.zeros(0, 2, 2), torch.zeros(0, 2, 2))
    assert torch.equal(z0, z_base)
    z0.add_(1)  # a copy, not z_base itself
    assert torch.equal(z_base, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_momentum_softmax_numbers():
    """The weights quoted in test_momentum_init_by_hand."""
    total = math.e + 1 + 1 / math.e
    assert (math.e / total, 1 / total, (1 / math.e) / total) == pytest.approx((0.665241, 0.244728, 0.090031), abs=1e-6)
