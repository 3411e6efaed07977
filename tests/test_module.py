"""LatentSeek mechanics on tiny random models."""

import copy

import lightning as L
import pytest
import torch

from lit_latent.rewards import MajorityReward, SelfReward, VerifierReward
from custom_rewards import FirstCharReward, PassAfterReward
from lit_latent.config import AdaptConfig, GenerationConfig, LatentConfig
from lit_latent.data import ProblemDataModule
from lit_latent.engine import Engine
from lit_latent.module import LatentAdaptationModule
from callbacks.rewards import ForgetFinishedProblems

PROBLEMS = [
    {"id": "p0", "problem": "What is 2 + 3?", "answer": "5", "choices": None},
    {"id": "p1", "problem": "Tom has 4 apples and buys 3 more. How many?", "answer": "7", "choices": None},
    {"id": "p2", "problem": "Half of 10?", "answer": "5", "choices": None},
]


def make_cfg(**latent):
    cfg = AdaptConfig(method="latentseek", generation=GenerationConfig(max_new_tokens=8))
    cfg.latent = LatentConfig(**{**dict(lr=0.5, rho=1.0, max_latents=1, max_iterations=6), **latent})
    return cfg


def run(model, tokenizer, cfg, reward, problems=PROBLEMS):
    module = LatentAdaptationModule(model, tokenizer, cfg, reward)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ForgetFinishedProblems(reward)], inference_mode=False,
                        enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(module, datamodule=ProblemDataModule(problems, batch_size=2))
    return [r for batch in out for r in batch]


def first_tokens(model, tokenizer, problem):
    engine = Engine(model, tokenizer, make_cfg())
    head = model.get_output_embeddings()
    out = engine.generate(engine.encode([problem]), return_hidden=True)
    top2 = head(out.hidden[0][0]).topk(2).indices.tolist()
    return [tokenizer.decode([t]) for t in top2]


def test_reward_preferring_a_token_flips_the_optimized_latent_to_it(tiny_model, char_tokenizer):
    # each problem's first latent decodes to `greedy`; the reward pays only for `runner_up`
    greedy, runner_up = first_tokens(tiny_model, char_tokenizer, PROBLEMS[0])
    reward = FirstCharReward(target=runner_up, original=greedy, keep=0.0)
    cfg = make_cfg(lr=0.1, samples=32, sample_temperature=0.1, stop_threshold=2.0, max_iterations=6)
    recs = run(tiny_model, char_tokenizer, cfg, reward)
    for rec in recs:
        prefixes = [c["latent_prefix"] for c in rec["candidates"]]
        assert rec["initial_output"].startswith(greedy)
        assert prefixes[-1] == runner_up, prefixes
        assert prefixes.index(runner_up) <= 4  # within a few steps, and it stays
        assert all(p == runner_up for p in prefixes[prefixes.index(runner_up):])


def test_model_weights_are_bit_identical_and_only_latents_are_optimized(tiny_model, char_tokenizer, monkeypatch):
    before = copy.deepcopy(tiny_model.state_dict())
    model_params = {id(p) for p in tiny_model.parameters()}
    optimized = []
    real_adam = torch.optim.Adam

    def spy_adam(params, **kw):
        params = list(params)
        optimized.extend(params)
        return real_adam(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    run(tiny_model, char_tokenizer, make_cfg(max_latents=4), PassAfterReward(3))
    assert optimized and all(id(p) not in model_params for p in optimized)
    assert all(p.shape[-1] == tiny_model.config.hidden_size for p in optimized)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.parameters())


def test_early_stop_and_iteration_cap(tiny_model, char_tokenizer):
    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=6), PassAfterReward(2))
    assert [r["iterations"] for r in recs] == [2, 2, 2]
    assert all(r["rewards"] == [0.0, 0.0, 1.0] for r in recs)
    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=1), PassAfterReward(5))
    assert [r["iterations"] for r in recs] == [1, 1, 1]
    recs = run(tiny_model, char_tokenizer, make_cfg(), PassAfterReward(0))
    assert all(r["iterations"] == 0 and r["output"] == r["initial_output"] for r in recs)
    # tokens: the CoT's generated tokens (EOS included) + 1 per scoring in PassAfterReward
    engine = Engine(tiny_model, char_tokenizer, make_cfg())
    cot = engine.generate(engine.encode(PROBLEMS))
    assert [r["tokens"] for r in recs] == [n + 1 for n in cot.new_tokens]
    # each candidate adds its own generated tokens + 1; the record's total is the sum
    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=2), PassAfterReward(5))
    for r, n in zip(recs, cot.new_tokens):
        assert all(c["tokens"] >= 2 for c in r["candidates"])  # at least one new token and the scoring
        assert r["tokens"] == n + 1 + sum(c["tokens"] for c in r["candidates"])


def test_same_seed_same_records(tiny_model, char_tokenizer):
    def strip(recs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]

    cfg = make_cfg(samples=3, max_latents=3)
    a = run(tiny_model, char_tokenizer, cfg, PassAfterReward(3))
    b = run(tiny_model, char_tokenizer, cfg, PassAfterReward(3))
    assert strip(a) == strip(b)


def test_regenerate_after_first_change_regenerates_after_the_flip(tiny_model, char_tokenizer):
    cfg = make_cfg(max_latents=6, lr=0.05, regenerate_after_first_change=True)
    rec = run(tiny_model, char_tokenizer, cfg, PassAfterReward(6), PROBLEMS[:1])[0]
    engine = Engine(tiny_model, char_tokenizer, cfg)
    prompt = engine.encode(PROBLEMS[:1])
    initial = engine.generate(prompt).tokens[0][:6]
    flipped = 0
    for cand in rec["candidates"]:
        decoded = cand["latent_tokens"]
        first = next((t for t, (a, b) in enumerate(zip(decoded, initial)) if a != b), None)
        kept = decoded if first is None else decoded[: first + 1]
        flipped += first is not None and first < len(decoded) - 1
        # the answer is the latent prefix through its first flip, then the model's own greedy continuation
        expected = engine.generate(prompt, prefixes=[kept]).tokens[0]
        assert cand["output"] == engine.decode([expected])[0]
    assert flipped >= 1  # some candidate really dropped latent tokens after a flip


# factories: a reward instance made at collection would be shared by the llama and qwen2 runs
# (the majority reward would read the first model's cached vote in the second)
@pytest.mark.parametrize("make_reward", [VerifierReward, lambda: SelfReward("latentseek"), lambda: SelfReward("latentevolve"),
                                         lambda: SelfReward("steps"), lambda: MajorityReward(3)])
def test_every_reward_kind_is_in_unit_interval(tiny_model, char_tokenizer, make_reward):
    reward = make_reward()
    engine = Engine(tiny_model, char_tokenizer, make_cfg())
    completions = ["2 + 3 = 5\nThe answer is \\boxed{5}.", "4 + 3 = 8\nThe answer is \\boxed{8}.", "garbage"]
    scores = reward.score(engine, PROBLEMS, completions)
    assert len(scores.rewards) == 3 and all(0.0 <= r <= 1.0 for r in scores.rewards)
    if isinstance(reward, VerifierReward):
        assert scores.rewards == [1.0, 0.0, 0.0]


def test_majority_votes_once_per_problem_and_forgets_it_after_the_batch(tiny_model, char_tokenizer):
    engine = Engine(tiny_model, char_tokenizer, make_cfg())
    reward = MajorityReward(3)
    completions = ["2 + 3 = 5\nThe answer is \\boxed{5}."] * 3
    first = reward.score(engine, PROBLEMS, completions)
    again = reward.score(engine, PROBLEMS, completions)
    assert all(n > 0 for n in first.tokens) and again.tokens == [0, 0, 0]  # the vote's cost is counted once
    assert again.rewards == first.rewards
    reward.forget([p["id"] for p in PROBLEMS])
    assert reward.score(engine, PROBLEMS, completions).tokens == first.tokens  # voted anew, same seeds


def test_nan_reward_keeps_last_good_candidate_and_the_run_goes_on(tiny_model, char_tokenizer):
    from custom_rewards import NaNReward

    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=4, max_latents=3), NaNReward(bad="p1"))
    bad = next(r for r in recs if r["id"] == "p1")
    assert bad["status"] == "numerical_error" and "non-finite reward at iteration 2" in bad["numerical_error"]
    assert bad["iterations"] == 1 and bad["output"] == bad["candidates"][-1]["output"]
    assert all(r["status"] == "ok" and r["iterations"] == 4 for r in recs if r["id"] != "p1")


def test_nan_in_latents_is_caught(tiny_model, char_tokenizer, monkeypatch):
    import lit_latent.search as module_lib

    real = module_lib.token_log_probs
    calls = {"n": 0}

    def poisoned(head, latents, tokens, temperature=1.0):
        calls["n"] += 1
        out = real(head, latents, tokens, temperature)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(module_lib, "token_log_probs", poisoned)
    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=3), PassAfterReward(10), PROBLEMS[:2])
    flagged = [r for r in recs if r["status"] == "numerical_error"]
    assert len(flagged) == 1 and "non-finite loss" in flagged[0]["numerical_error"]
    assert all(r["iterations"] == 3 for r in recs if r["status"] == "ok")


def test_answer_best_keeps_the_highest_reward_candidate(tiny_model, char_tokenizer):
    from lit_latent.rewards import Reward, Scores

    class Decreasing(Reward):
        def __init__(self):
            self.seen = {}

        def score(self, engine, problems, completions):
            for p in problems:
                self.seen[p["id"]] = self.seen.get(p["id"], 0) + 1
            return Scores([0.6 if self.seen[p["id"]] == 1 else 0.1 for p in problems], [0] * len(problems))

    recs = run(tiny_model, char_tokenizer, make_cfg(max_iterations=3, max_latents=3, answer="best"), Decreasing())
    for r in recs:
        assert r["iterations"] == 3 and r["chosen_candidate"] == 0
        assert r["output"] == r["initial_output"] and r["correct"] == r["initial_correct"]
    last = run(tiny_model, char_tokenizer, make_cfg(max_iterations=3, max_latents=3), Decreasing())
    assert all(r["output"] == r["candidates"][-1]["output"] for r in last)
