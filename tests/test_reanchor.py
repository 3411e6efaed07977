"""latent.reanchor: after a new candidate that scores at least as well as the anchor, the
latents become that candidate's, so the loss covers the tokens that were scored."""

import pytest

from lit_latent.config import UserError
from lit_latent.latents import decode_latents
from lit_latent.rewards import Reward, Scores
from lit_latent.search import LatentSearch
from test_module import make_cfg
from test_perf import predict


class ScriptedReward(Reward):
    """Each problem's n-th scoring gets ``script[n]`` (n = 0: the initial answer)."""

    deterministic = False  # every candidate is generated and scored, so the script lines up

    def __init__(self, script):
        self.script, self.calls = script, {}

    def score(self, engine, problems, completions):
        rewards = []
        for p in problems:
            n = self.calls.get(p["id"], 0)
            self.calls[p["id"]] = n + 1
            rewards.append(self.script[n])
        return Scores(rewards, [0] * len(problems))


def test_latents_are_anchored_to_each_candidate_that_matches_the_anchor(tiny_model, char_tokenizer, monkeypatch):
    anchored = []  # (problem, candidate number, latent count before, what the latents decode to after)
    real = LatentSearch.reanchor

    def spy(self, i, kept, after):
        before = self.latents[i].shape[0]
        stepped = self.latents[i].detach().clone()
        real(self, i, kept, after)
        z = self.latents[i]
        assert z.requires_grad and z not in self.optimizer.state  # fresh Adam moments
        assert (z[:kept] == stepped[:kept]).all()  # the kept prefix's latents are the optimized ones
        anchored.append((i, self.records[i]["iterations"], before, decode_latents(self.head, z)))

    monkeypatch.setattr(LatentSearch, "reanchor", spy)
    # initial 0.5; then 0.25 (worse: no anchor), 0.5 (as good: anchor), 0.75 (anchor), 0.0, 0.5 (under 0.75: none)
    cfg = make_cfg(max_latents=6, lr=0.5, rho=1.0, max_iterations=5, regenerate_after_first_change=True, reanchor=True)
    records = predict(tiny_model, char_tokenizer, cfg, ScriptedReward([0.5, 0.25, 0.5, 0.75, 0.0, 0.5]), batch_size=3)
    assert [(i, n) for i, n, _, _ in anchored] == [(i, n) for n in (2, 3) for i in range(3)]
    for i, n, before, decoded in anchored:
        candidate = records[i]["candidates"][n - 1]["output"]
        # the anchored latents decode to the scored candidate's own first tokens
        assert candidate.startswith(char_tokenizer.decode(decoded)) and 0 < len(decoded) <= before
        assert len(decoded) == min(before, len(char_tokenizer(candidate, add_special_tokens=False)["input_ids"]))


def test_without_reanchor_nothing_is_anchored(tiny_model, char_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(LatentSearch, "reanchor", lambda self, *a: calls.append(a))
    cfg = make_cfg(max_latents=6, lr=0.5, rho=1.0, max_iterations=3, regenerate_after_first_change=True)
    predict(tiny_model, char_tokenizer, cfg, ScriptedReward([0.5, 0.75, 1.0, 1.0]), batch_size=3)
    assert calls == []


def test_reanchor_needs_greedy_candidates():
    with pytest.raises(UserError, match="latent.reanchor: .* latent.samples=1"):
        make_cfg(reanchor=True, samples=4)


def test_with_loss_tokens_scored_the_loss_covers_the_last_candidates_kept_prefix(tiny_model, char_tokenizer, monkeypatch):
    from lit_latent.latents import keep_through_first_change

    ends = {}  # problem -> the `end` of each greedy loss
    real = LatentSearch.greedy_loss
    monkeypatch.setattr(LatentSearch, "greedy_loss",
                        lambda self, i, adv, start=0, end=None: ends.setdefault(i, []).append(end) or real(self, i, adv, start, end))
    cfg = make_cfg(max_latents=6, lr=0.5, rho=1.0, max_iterations=4, regenerate_after_first_change=True, loss_tokens="scored")
    records = predict(tiny_model, char_tokenizer, cfg, ScriptedReward([0.0] * 6), batch_size=3)
    for i, r in enumerate(records):
        cot = char_tokenizer(r["initial_output"], add_special_tokens=False)["input_ids"][:6]
        kept = [len(keep_through_first_change(c["latent_tokens"], cot)) for c in r["candidates"]]
        assert ends[i] == [None] + kept[:-1]  # the first step: the CoT, scored whole
    assert any(e is not None and e < 6 for row in ends.values() for e in row)  # some candidates were cut
