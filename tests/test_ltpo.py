"""LTPO (lit_latent/methods/ltpo.py) and the confidence reward, on tiny random models and the embedded one."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lit_latent.methods.ltpo as ltpo_module
from lit_latent.config import AdaptConfig, GenerationConfig, LtpoConfig, RewardConfig, UserError
from lit_latent.engine import Engine
from lit_latent.kvcache import _left_pad
from lit_latent.methods.ltpo import ltpo, placeholder_ids, thought_prompts
from lit_latent.rewards import ConfidenceReward, confidence_reward, make_reward, top_k_confidence

PROBLEMS = [{"id": "a", "problem": "What is 3 + 4?", "answer": "7"}, {"id": "b", "problem": "Sum 12 and 30.", "answer": "42"}]


def make_engine(model, tokenizer, **ltpo_keys) -> tuple[Engine, LtpoConfig]:
    cfg = AdaptConfig(method="ltpo", reward=RewardConfig(kind="confidence"), generation=GenerationConfig(max_new_tokens=6),
                      ltpo=LtpoConfig(**ltpo_keys))
    return Engine(model, tokenizer, cfg), cfg.ltpo


def token_embeddings(engine: Engine, cfg: LtpoConfig):
    rows, starts = thought_prompts(engine, PROBLEMS, placeholder_ids(engine, cfg.placeholder, cfg.thoughts))
    ids, mask = _left_pad(rows, engine.pad_id, engine.device)
    return rows, starts, ids, engine.model.get_input_embeddings()(ids)


def test_the_prompt_holds_k_placeholders_before_the_assistant_turn(tiny_model, char_tokenizer):
    engine, cfg = make_engine(tiny_model, char_tokenizer, thoughts=4)
    rows, starts, _, _ = token_embeddings(engine, cfg)
    unk = char_tokenizer.unk_token_id  # the char tokenizer's only special token the chat prompt never writes
    for row, start in zip(rows, starts):
        assert row[start : start + 4] == [unk] * 4 and row[start + 4] != unk
        text = char_tokenizer.decode(row)
        assert "4 special tokens" in text and text.endswith("<|assistant|>")


def test_without_steps_the_answer_is_the_greedy_answer_to_the_placeholder_prompt(tiny_model, char_tokenizer):
    # H0 are exactly the placeholders' embeddings, and the answer is generated from the embeddings
    engine, cfg = make_engine(tiny_model, char_tokenizer, thoughts=3, steps=0)
    rows, *_ = token_embeddings(engine, cfg)
    records = ltpo(engine, PROBLEMS, cfg, top_k=10)
    assert [r["output"] for r in records] == engine.decode(engine.generate(rows).tokens)
    assert [r["iterations"] for r in records] == [0, 0]


def test_the_answer_is_generated_with_the_optimized_thoughts_in_place(tiny_model, char_tokenizer, monkeypatch):
    # what the answer's prompt holds: the token embeddings everywhere but at the thoughts, which moved; the
    # answer position then sees other logits than with the placeholders
    engine, cfg = make_engine(tiny_model, char_tokenizer, thoughts=3, steps=2)
    rows, starts, ids, embeds = token_embeddings(engine, cfg)
    seen = []
    encode = ltpo_module.encode_prompt_embeddings
    monkeypatch.setattr(ltpo_module, "encode_prompt_embeddings", lambda model, e, m: seen.append(e.clone()) or encode(model, e, m))
    ltpo(engine, PROBLEMS, cfg, top_k=10)
    (final,) = seen
    width = ids.shape[1]
    thought = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):  # left padding shifts each row's thoughts
        thought[i, width - len(row) + start : width - len(row) + start + 3] = True
    torch.testing.assert_close(final[~thought], embeds[~thought])
    assert (final[thought] - embeds[thought]).abs().amax(-1).min() > 1e-3  # every thought moved
    mask = (ids != engine.pad_id).long()
    with torch.no_grad():
        moved = tiny_model(inputs_embeds=final, attention_mask=mask).logits[:, -1]
        placed = tiny_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert (moved - placed).abs().amax() > 1e-4


@pytest.mark.parametrize("keep", ["scored", "updated"])
def test_the_best_scored_step_answers_even_when_it_is_an_early_one(keep, char_tokenizer, monkeypatch):
    # a scripted confidence: step 1 (of 4) scores best. keep=scored answers with the noisy thoughts the model saw
    # at step 1; keep=updated with H right after step 1's update, which the model sees at step 2 (sigma ~ 0)
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(char_tokenizer))
    script = iter([5.0, 9.0, 3.0, 4.0])
    monkeypatch.setattr(ltpo_module, "top_k_confidence",
                        lambda logits, k: logits.float().mean(-1) * 1e-6 + next(script))  # [A, K]: the script, with a gradient
    forward, seen = model.base_model.forward, []

    def spy(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None and not kwargs.get("use_cache"):
            seen.append(kwargs["inputs_embeds"].detach().clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "forward", spy)
    answered = []
    encode = ltpo_module.encode_prompt_embeddings
    monkeypatch.setattr(ltpo_module, "encode_prompt_embeddings", lambda m, e, mask: answered.append(e.clone()) or encode(m, e, mask))
    engine, cfg = make_engine(model, char_tokenizer, thoughts=2, steps=4, sigma=1e-7 if keep == "updated" else 0.1, keep=keep)
    problems = PROBLEMS[:1]
    records = ltpo(engine, problems, cfg, top_k=10)
    assert len(seen) == 4 and records[0]["chosen_step"] == 1
    assert records[0]["rewards"] == pytest.approx([confidence_reward(s, 10) for s in (5.0, 9.0, 3.0, 4.0)], abs=1e-5)
    step = 1 if keep == "scored" else 2
    torch.testing.assert_close(answered[0], seen[step], atol=1e-5, rtol=0)
    assert (seen[1] - seen[2]).abs().amax() > 1e-3  # the steps are told apart


def test_confidence_reward_against_a_hand_computation(tiny_model, char_tokenizer):
    cfg = AdaptConfig(reward=RewardConfig(kind="confidence", top_k=5))
    engine = Engine(tiny_model, char_tokenizer, cfg)
    reward = make_reward(cfg.reward)
    assert isinstance(reward, ConfidenceReward) and reward.deterministic and not reward.uses_labels
    completions = ["3 + 4 = 7", "12 + 30 = 42. So 42."]
    scores = reward.score(engine, PROBLEMS, completions)
    assert scores.tokens == [0, 0]  # nothing generated
    for p, c, got, detail in zip(PROBLEMS, completions, scores.rewards, scores.details):
        prompt = engine.encode([p])[0]
        answer = char_tokenizer(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(tiny_model(input_ids=torch.tensor([prompt + answer])).logits[0].double(), -1)
        # the distributions that predicted each answer token: positions len(prompt) - 1 .. end - 1
        per_token = [-probs[j].topk(5).values.log().mean() for j in range(len(prompt) - 1, len(prompt) + len(answer) - 1)]
        score = float(sum(per_token) / len(per_token))
        assert detail["confidence"] == pytest.approx(score, rel=1e-4)
        assert got == pytest.approx(1 - math.log(5) / score, rel=1e-4)


def test_top_k_confidence_is_log_k_for_k_equal_tokens_and_grows_with_a_peak():
    even = torch.tensor([0.0] * 4 + [-1e4] * 6)  # four equally likely tokens of ten
    assert float(top_k_confidence(even, k=4)) == pytest.approx(math.log(4))
    assert confidence_reward(math.log(4), k=4) == 0.0
    peaked = torch.tensor([10.0] + [0.0] * 9)
    assert float(top_k_confidence(peaked, k=4)) > math.log(4)
    assert 0 < confidence_reward(float(top_k_confidence(peaked, k=4)), k=4) < 1


@pytest.mark.parametrize("override, key", [
    (["method=ltpo"], "reward.kind"),
    (["--config", "configs/ltpo.yaml", "ltpo.thoughts=0"], "ltpo.thoughts"),
    (["--config", "configs/ltpo.yaml", "ltpo.gradient=sgd"], "ltpo.gradient"),
    (["--config", "configs/ltpo.yaml", "ltpo.sigma_decay=1.5"], "ltpo.sigma_decay"),
    (["--config", "configs/ltpo.yaml", "perf.reference_mode=true"], "perf.reference_mode"),
    (["--config", "configs/ltpo.yaml", "reward.top_k=0"], "reward.top_k"),
])
def test_bad_ltpo_keys_are_one_line_errors_naming_the_key(override, key):
    from lit_latent.cli import load_config, parse_args

    files, overrides, _ = parse_args(override)
    with pytest.raises(UserError, match=f"config key {key}"):
        load_config(AdaptConfig, files, overrides)


def test_an_unknown_placeholder_is_refused(tiny_model, char_tokenizer):
    engine, _ = make_engine(tiny_model, char_tokenizer)
    with pytest.raises(UserError, match="config key ltpo.placeholder"):
        placeholder_ids(engine, "<|nope|>", 3)
    assert placeholder_ids(engine, "<eos>", 2) == [1, 1]


def test_ltpo_runs_on_the_embedded_model_and_the_report_reads_it(tmp_path):
    import adapt
    from lit_latent.config import MODEL_DIR
    from lit_latent.report import main as report
    from lit_latent.results import read_records
    from transformers import AutoTokenizer

    adapt.main(["--config", "configs/ltpo.yaml", "data.limit=2", "ltpo.steps=2", "generation.max_new_tokens=40",
                f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"])
    records = read_records(tmp_path / "run" / "predictions.jsonl")
    assert len(records) == 2
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    for r in records:
        assert r["method"] == "ltpo" and r["iterations"] == 2 and len(r["candidates"]) == 2
        # a special token of the template that the chat prompt never writes
        assert r["placeholder"] == "<|system|>" and tokenizer.convert_tokens_to_ids("<|system|>") in tokenizer.added_tokens_decoder
        assert all(0 <= x <= 1 for x in r["rewards"]) and r["chosen_step"] in (0, 1)
    report([str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert "ltpo" in (tmp_path / "report" / "report.md").read_text()
