"""The fast path against the reference cost profile, and the active set of a batch."""

import lightning as L
import pytest
import torch

from custom_rewards import PassAfterReward
from lit_latent.data import ProblemDataModule
from lit_latent.engine import Engine
from lit_latent.module import LatentAdaptationModule
from test_module import PROBLEMS, make_cfg


def predict(model, tokenizer, cfg, reward, batch_size):
    module = LatentAdaptationModule(model, tokenizer, cfg, reward)
    trainer = L.Trainer(accelerator="cpu", logger=False, inference_mode=False,
                        enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(module, datamodule=ProblemDataModule(PROBLEMS, batch_size))
    return [{k: v for k, v in r.items() if k != "seconds"} for b in out for r in b]


def test_fast_path_and_reference_mode_give_identical_records(tiny_model, char_tokenizer):
    for samples in (1, 3):
        cfg = make_cfg(max_latents=4, lr=0.05, samples=samples)
        fast = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
        cfg.perf.reference_mode = True
        slow = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=1)
        assert fast == slow


class StopFirst(PassAfterReward):
    """Problem p0 passes at its first candidate; the others never pass."""

    def score(self, engine, problems, completions):
        scores = super().score(engine, problems, completions)
        scores.rewards = [1.0 if p["id"] == "p0" and self.seen[p["id"]] == 2 else 0.0 for p in problems]
        return scores


def test_a_finished_problem_leaves_the_active_set(tiny_model, char_tokenizer, monkeypatch):
    steps = []  # per optimizer step: (the latents it holds, those with Adam state), as copies
    real_adam = torch.optim.Adam

    class SpyAdam(real_adam):
        def step(self, closure=None):
            result = super().step(closure)
            held = [p for g in self.param_groups for p in g["params"]]
            steps.append((held, [p.detach().clone() for p in held], len(self.state)))
            return result

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    recs = predict(tiny_model, char_tokenizer, make_cfg(max_latents=3, max_iterations=4), StopFirst(0), batch_size=3)
    assert [r["iterations"] for r in recs] == [1, 4, 4]
    assert len(steps) == 4
    p0 = steps[0][0][0]  # p0's latents: stepped once, then it passed
    first_value = steps[0][1][0]
    assert [len(held) for held, _, _ in steps] == [3, 2, 2, 2] and [n for _, _, n in steps] == [3, 2, 2, 2]
    # after it stops, the optimizer holds neither p0's latents nor its state, and they never move again
    assert all(not any(p is p0 for p in held) for held, _, _ in steps[1:])
    assert torch.equal(p0.detach(), first_value)
    # the others keep moving
    assert not torch.equal(steps[1][1][0], steps[3][1][0])


def test_shared_openings_groups_rows_by_their_common_start():
    from lit_latent.engine import shared_openings

    base = list(range(1, 21))
    other = [50 + k for k in range(17)]
    rows = [base + [30], [7, 8], base + [31, 32], base[:4] + other, base + [30, 33], base[:4] + other + [9]]
    groups = sorted((sorted(m), cut) for cut, m in shared_openings(rows, min_shared=16))
    # 0, 2, 4 share 20 tokens (0 and 4 share 21: giving up one token for a third member pays);
    # 3 and 5 share 21 tokens but only 4 with the others: their own group
    assert groups == [([0, 2, 4], 20), ([1], 1), ([3, 5], 20)]  # a row alone keeps its last token


def test_shared_prefill_of_verification_prompts_gives_the_same_answers(tiny_model, char_tokenizer):
    from lit_latent.prompts import HOLISTIC_QUESTIONS, holistic_check_prompt, step_check_prompt

    solutions = ["12 + 3 = 15\nThe answer is \\boxed{15}.", "12 + 3 = 16\nThe answer is \\boxed{16}."]
    messages = [holistic_check_prompt(c, "Tom has 12 apples and gets 3 more.", s) for s in solutions for c in HOLISTIC_QUESTIONS]
    messages += [step_check_prompt("12 + 3 = 15"), messages[0]]  # an unrelated prompt and a duplicate
    cfg = make_cfg()
    cfg.perf.chunk = 5  # groups are split over several chunks
    fast = Engine(tiny_model, char_tokenizer, cfg).complete(messages, max_new_tokens=6)
    cfg.perf.reference_mode = True
    slow = Engine(tiny_model, char_tokenizer, cfg).complete(messages, max_new_tokens=6)
    assert fast == slow
    assert fast[0][0] == fast[0][-1] and all(n > 0 for n in fast[1])


def test_sliding_window_models_keep_transformers_masks_and_give_the_same_answers(char_tokenizer):
    # a layer with an 8-token window: packed checks (one custom mask for all layers) would let
    # it see too far, so such models take the one-row-per-message path; both must equal the reference
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_latent.kvcache import full_attention, new_cache
    from lit_latent.prompts import holistic_check_prompt

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=1, pad_token_id=0, eos_token_id=1, bos_token_id=None)).eval().requires_grad_(False)
    assert not full_attention(new_cache(model, room=8))
    messages = [holistic_check_prompt(c, "Tom has 12 apples.", "12 + 3 = 15") for c in ("calculation", "answer", "format")]
    cfg = make_cfg()
    fast = Engine(model, char_tokenizer, cfg).complete(messages, max_new_tokens=6)
    cfg.perf.reference_mode = True
    assert fast == Engine(model, char_tokenizer, cfg).complete(messages, max_new_tokens=6)


def test_continuous_batching_gives_the_same_records_as_the_whole_batch(tiny_model, char_tokenizer):
    for samples in (1, 2):
        cfg = make_cfg(max_latents=4, lr=0.05, samples=samples)
        whole = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
        cfg.perf.max_active = 1  # one problem at a time: each next one takes the freed slot
        sliding = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
        assert sliding == whole


def test_a_freed_slot_goes_to_the_next_problem(tiny_model, char_tokenizer, monkeypatch):
    from lit_latent import engine as module_py

    widths = []
    real = module_py.Engine.generate

    def spy(self, prompts, **kw):
        widths.append((len(prompts), kw.get("prefixes") is not None))
        return real(self, prompts, **kw)

    monkeypatch.setattr(module_py.Engine, "generate", spy)
    cfg = make_cfg(max_latents=3, max_iterations=4)
    cfg.perf.max_active = 2
    recs = predict(tiny_model, char_tokenizer, cfg, StopFirst(0), batch_size=3)
    assert [r["iterations"] for r in recs] == [1, 4, 4]
    # two problems start; p0 stops after one iteration and p2 starts in its slot; never more than 2 adapt
    assert widths[:3] == [(2, False), (2, True), (1, False)]
    assert all(n <= 2 for n, regenerating in widths if regenerating)


def test_a_later_candidate_continues_from_the_cached_opening_of_an_earlier_one(tiny_model, char_tokenizer, monkeypatch):
    from lit_latent import engine as module_py
    from lit_latent.prompts import HOLISTIC_QUESTIONS, holistic_check_prompt

    problem = "Tom has 12 apples and gets 3 more."
    first = [holistic_check_prompt(c, problem, "12 + 3 = 15\nThe answer is \\boxed{15}.") for c in HOLISTIC_QUESTIONS]
    later = [holistic_check_prompt(c, problem, "12 + 3 = 16\nThe answer is \\boxed{16}.") for c in HOLISTIC_QUESTIONS]
    cfg = make_cfg()
    fast = Engine(tiny_model, char_tokenizer, cfg)
    extended = []
    real_extend = module_py.extend_prompts

    def spy(model, state, blocks, pad_id):
        extended.append([len(b) for b in blocks])
        return real_extend(model, state, blocks, pad_id)

    monkeypatch.setattr(module_py, "extend_prompts", spy)
    got = [fast.complete(first, max_new_tokens=6), fast.complete(later, max_new_tokens=6)]
    # the second call encoded only what follows "...12 + 3 = 1" of the first candidate's opening
    opening = fast.encode_messages([later[0]])[0]
    assert len(extended) == 1 and 0 < extended[0][0] < len(opening) // 3
    cfg.perf.reference_mode = True
    slow = Engine(tiny_model, char_tokenizer, cfg)
    assert got == [slow.complete(first, max_new_tokens=6), slow.complete(later, max_new_tokens=6)]


def test_bf16_autocast_switch_runs_latentseek_with_self_reward_and_keeps_weights(char_tokenizer):
    # the GPU switch, exercised on CPU (autocast supports bf16 there): generation, the packed
    # verification masks and the latents' float32 loss all run under it
    from lit_latent.rewards import SelfReward
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(char_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_cfg(max_latents=4, lr=0.05)
    cfg.perf.autocast = True
    records = predict(model, char_tokenizer, cfg, SelfReward(), batch_size=3)
    assert len(records) == len(PROBLEMS) and all(0 <= c["reward"] <= 1 for r in records for c in r["candidates"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_under_bf16_autocast_the_latents_still_move_to_the_rewarded_token(char_tokenizer):
    # the bug this catches: latents decoded through autocast's cached bf16 cast of the leaf kept
    # decoding to their first tokens after every Adam step, so nothing was ever adapted
    from conftest import make_tiny_model
    from custom_rewards import FirstCharReward
    from test_module import first_tokens

    model = make_tiny_model("llama", len(char_tokenizer))
    greedy, runner_up = first_tokens(model, char_tokenizer, PROBLEMS[0])
    cfg = make_cfg(lr=0.1, samples=32, sample_temperature=0.1, stop_threshold=2.0, max_iterations=6)
    cfg.perf.autocast = True
    for r in predict(model, char_tokenizer, cfg, FirstCharReward(target=runner_up, original=greedy, keep=0.0), batch_size=3):
        prefixes = [c["latent_prefix"] for c in r["candidates"]]
        assert r["initial_output"].startswith(greedy) and prefixes[-1] == runner_up, prefixes


@pytest.mark.slow
def test_compiled_forward_gives_the_same_records(char_tokenizer):
    from conftest import make_tiny_model

    cfg = make_cfg(max_latents=4, lr=0.05)
    eager = predict(make_tiny_model("llama", len(char_tokenizer)), char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
    cfg.perf.compile = True  # ~1.5 min of compiling on a 2-core CPU
    compiled = predict(make_tiny_model("llama", len(char_tokenizer)), char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
    assert [r["final_answer"] for r in compiled] == [r["final_answer"] for r in eager]


def test_a_prefix_tried_before_is_not_regenerated_and_answers_match_the_reference(char_tokenizer, monkeypatch):
    # a learning rate too small to flip a token: every update decodes the original prefix again,
    # so with a deterministic reward the fast path generates it once (the random model's first
    # answer ran to max_new_tokens, so its continuation is longer: not the same candidate)
    from lit_latent.rewards import VerifierReward
    from conftest import make_tiny_model
    from lit_latent import engine as module_py

    model = make_tiny_model("llama", len(char_tokenizer))
    cfg = make_cfg(max_latents=4, lr=1e-6, max_iterations=3)
    calls = []
    real = module_py.Engine.generate
    monkeypatch.setattr(module_py.Engine, "generate",
                        lambda self, prompts, **kw: calls.append(kw.get("prefixes") is not None) or real(self, prompts, **kw))
    fast = predict(model, char_tokenizer, cfg, VerifierReward(), batch_size=3)
    assert calls == [False, True]  # the first answers, then the prefix's continuation once
    assert all(r["iterations"] == 3 and [c["tokens"] == 0 for c in r["candidates"]] == [False, True, True] for r in fast)
    assert all(r["generations"] == 1 and [c["generations"] for c in r["candidates"]] == [1, 0, 0] for r in fast)
    cfg.perf.reference_mode = True
    slow = predict(model, char_tokenizer, cfg, VerifierReward(), batch_size=1)
    assert len(calls) == 2 + len(PROBLEMS) * (1 + 3)  # the reference regenerates every candidate
    cost = ("tokens", "generations")
    drop = lambda r: {k: v for k, v in r.items() if k not in cost} | {"candidates": [{k: v for k, v in c.items() if k not in cost} for c in r["candidates"]]}
    assert [drop(r) for r in fast] == [drop(r) for r in slow]
    assert all(s["tokens"] > f["tokens"] and s["generations"] == 3 for f, s in zip(fast, slow))


@pytest.mark.parametrize("free_repeats, iterations", [(0, 3), (2, 5), (9, 12)])
def test_free_repeats_do_not_count_toward_the_iterations(char_tokenizer, free_repeats, iterations):
    # every update decodes the original prefix again (lr too small to flip a token): the first
    # candidate is new, the rest repeat it; latent.free_repeats of those do not spend one of K = 3
    from lit_latent.rewards import VerifierReward
    from conftest import make_tiny_model

    cfg = make_cfg(max_latents=4, lr=1e-6, max_iterations=3)
    cfg.latent.free_repeats = free_repeats
    for r in predict(make_tiny_model("llama", len(char_tokenizer)), char_tokenizer, cfg, VerifierReward(), batch_size=3):
        assert r["iterations"] == iterations and r["generations"] == 1
        assert [c["generations"] for c in r["candidates"]] == [1] + [0] * (iterations - 1)


def test_latents_updated_in_place_decode_to_their_new_tokens_under_autocast():
    # autocast caches its bf16 cast of a leaf that requires grad until the context ends: read
    # through it, latents stepped in place by Adam kept decoding to their first tokens (the
    # embedded model under perf.autocast adapted nothing: 0 fixed / 0 broken in 200)
    from lit_latent.latents import decode_latents, sample_latents

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    z = torch.randn(6, 8).requires_grad_(True)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = decode_latents(head, z)
        with torch.no_grad():
            z.mul_(-1.0)  # an in-place update, as an optimizer step is
        moved = decode_latents(head, z)
        sampled = sample_latents(head, z, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    expected = head(z.detach()).argmax(-1).tolist()
    assert moved == expected == sampled and moved != first
