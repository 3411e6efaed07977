"""The embedded model: its generated data, tokenizer, shipped weights and training module."""

import json
import random

import pytest
import torch

from lit_latent.embedded import HELDOUT_PATH, MODEL_DIR
from lit_latent.embedded.checks import (
    CANDIDATE_KINDS,
    TASKS,
    candidate,
    check_example,
    final_label,
    holistic_label,
    line_true,
)
from lit_latent.embedded.problems import heldout_problems, make_problem, numbers_in, train_problems
from lit_latent.prompts import (
    HOLISTIC_QUESTIONS,
    calculation_lines,
    final_check_answer,
    final_check_prompt,
    parse_line,
    parse_verdict,
    step_check_prompt,
)


@pytest.fixture(scope="module")
def heldout():
    with open(HELDOUT_PATH) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def test_generator_is_deterministic():
    assert heldout_problems(40) == heldout_problems(40)
    a = [make_problem(random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    s1, s2 = train_problems(3), train_problems(3)
    assert [next(s1) for _ in range(20)] == [next(s2) for _ in range(20)]


def test_bundled_heldout_is_the_generators(heldout):
    assert len(heldout) == 1000
    assert heldout[:100] == heldout_problems(100)
    assert set(heldout[0]) == {"id", "problem", "answer", "solution", "steps"}


def test_gold_answers_recompute():
    stream = train_problems(1)
    problems = heldout_problems(200) + [next(stream) for _ in range(200)]
    for p in problems:
        lines = calculation_lines(p["solution"])
        assert len(lines) == p["steps"] and 2 <= p["steps"] <= 5
        known = set(numbers_in(p["problem"]))
        for ln in lines:
            a, _, b, c = parse_line(ln)
            assert line_true(ln), ln
            assert a in known and b in known, (p["problem"], ln)
            assert 0 <= c < 1000
            known.add(c)
        assert str(parse_line(lines[-1])[3]) == p["answer"]
        assert p["solution"].endswith(f"The answer is \\boxed{{{p['answer']}}}.")


def test_train_and_heldout_are_disjoint():
    held = {p["problem"] for p in heldout_problems(1000)}
    stream = train_problems(0, exclude=held)
    train = [next(stream)["problem"] for _ in range(3000)]
    assert not held & set(train)
    # without the exclusion the stream would overlap: the split is real, not luck
    assert len(held) == 1000


@pytest.mark.parametrize("task", TASKS)
def test_checking_data_has_both_verdicts(task):
    rng = random.Random(0)
    problems = heldout_problems(60)
    labels = {check_example(rng, p, task)[1] for p in problems}
    assert labels == {True, False}


def test_candidate_labels():
    rng = random.Random(1)
    p = heldout_problems(8)[7]
    gold = p["solution"]
    assert all(holistic_label(c, p, gold) for c in HOLISTIC_QUESTIONS) and final_label(gold)
    for kind in CANDIDATE_KINDS:
        assert isinstance(candidate(rng, p, kind), str)
    wrong_final = candidate(rng, p, "wrong_final")
    assert not final_label(wrong_final) and not holistic_label("answer", p, wrong_final)
    assert not holistic_label("format", p, candidate(rng, p, "no_boxed"))
    assert not holistic_label("clarity", p, candidate(rng, p, "two_answers"))
    prompt, label = check_example(rng, p, "step", want=True)
    assert label and prompt in {step_check_prompt(ln) for ln in calculation_lines(gold)}


def test_tokenizer(shipped):
    _, tok = shipped
    p = heldout_problems(1)[0]
    assert tok.decode(tok(p["solution"], add_special_tokens=False).input_ids) == p["solution"]
    weird = "Natalia sold 48 clips — ½ of ∫x² dx, 日本語!\n\t$\\frac{3}{4}$"
    assert tok.decode(tok(weird, add_special_tokens=False).input_ids) == weird
    for ids in tok(["1234567890", "x 907 y"], add_special_tokens=False).input_ids:
        pieces = [tok.decode([i]) for i in ids]
        assert all(len(s.strip()) <= 1 or not any(ch.isdigit() for ch in s) for s in pieces), pieces
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_shipped_model_solves_some_but_not_all(shipped, heldout):
    from lit_latent.embedded.evaluate import cot_accuracy

    model, tok = shipped
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    acc = cot_accuracy(model, tok, heldout[:50], batch_size=50)["overall"]
    assert 0.35 <= acc <= 0.65, acc


def test_shipped_model_answers_checks(shipped, heldout):
    from lit_latent.embedded.evaluate import ask

    model, tok = shipped
    rng = random.Random(0)
    # The one-word checks the default mix trains (the step check has share 0: recompute replaced it).
    prompts = [check_example(rng, p, task)[0] for p in heldout[:4] for task in ("operand", "holistic:calculation")]
    assert all(v is not None for v in ask(model, tok, prompts))
    assert parse_verdict("yes") is True


def test_shipped_model_finds_the_last_result_for_the_final_check(shipped, heldout):
    from lit_latent.embedded.checks import final_candidate
    from lit_latent.embedded.evaluate import final_check

    model, tok = shipped
    rng = random.Random(0)
    examples = [final_candidate(rng, p, want=i % 2 == 0) for i, p in enumerate(heldout[:12])]
    got = final_check(model, tok, [solution for solution, _ in examples])
    assert sum(g is label for g, (_, label) in zip(got, examples)) >= 10, (got, [label for _, label in examples])


def test_training_smoke(tmp_path, shipped):
    from lit_latent.embedded.train import fit

    _, tok = shipped
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    module = fit(tok, tmp_path / "ckpts", exclude=(), max_steps=3, shape=shape, max_tokens=1024, log_every=1)
    assert module.global_step == 3
    assert (tmp_path / "ckpts" / "step_00003_final" / "model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(module.stats["loss"]))


def test_mix_option_sets_the_task_shares_or_fails_in_one_line(capsys):
    import argparse

    from lit_latent.embedded.train import MIX, ExampleStream, parse_mix

    ap = argparse.ArgumentParser(prog="train.py")
    mix = parse_mix(["cot=0.3", "step=0.4", "final=0.15", "operand=0.05", "holistic=0.1"], ap)
    assert mix == {"cot": 0.3, "step": 0.4, "final": 0.15, "operand": 0.05, "holistic": 0.1, "recompute": 0.0}
    assert set(mix) == set(MIX)
    # the stream draws tasks by those shares: only steps when all weight is on them
    stream = ExampleStream(None, seed=0, mix=parse_mix(["step=1"], ap)).examples()
    assert {next(stream)[0] for _ in range(20)} == {"step"}
    for bad in (["cot=x"], ["steps=1"], ["cot=-1", "step=2"], ["cot=0"]):
        with pytest.raises(SystemExit):
            parse_mix(bad, ap)
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train.py: error: --mix:")


def test_recompute_examples_work_out_the_asked_calculation():
    from lit_latent.embedded.checks import recompute_example
    from lit_latent.prompts import parse_recomputed

    rng = random.Random(3)
    ops = set()
    for p in heldout_problems(40):
        prompt, answer = recompute_example(rng, p)
        x, op, y = prompt.removeprefix("Work out ").split(" column")[0].split()
        ops.add(op)
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "×": int(x) * int(y)}[op]
        assert parse_recomputed(answer, op) == value
        # one group per column of the prompt, each starting with that column's digits
        pairs = prompt.split("first: ")[1].rstrip(".").split(", ")
        assert [g[:3] for g in answer.split(", ")] == pairs
    assert ops == {"+", "-", "×"}  # divisions are asked as products


def test_final_examples_ask_for_the_last_result_of_candidates_of_both_labels():
    from lit_latent.embedded.checks import final_candidate, final_example
    from lit_latent.prompts import final_check_values, parse_final_check

    rng = random.Random(5)
    labels = []
    for i, p in enumerate(heldout_problems(40)):
        solution, label = final_candidate(rng, p, want=i % 2 == 0)
        labels.append(label)
        assert label is (i % 2 == 0)
        # the answer it is trained on, compared with the box, gives the label
        prompt, answer = final_check_prompt(solution), final_check_answer(solution)
        assert parse_final_check(answer, solution) is label
        assert answer == (final_check_values(solution)[0] or "none")
        assert "\\boxed" not in prompt
        prompt, answer = final_example(rng, p)
        lines = prompt.splitlines()[1:-1]
        assert answer == ("none" if lines == ["none"] else lines[-1].rsplit("=", 1)[1].replace(" ", ""))
    assert set(labels) == {True, False}


def test_recompute_answers_carry_their_own_loss_weight(shipped):
    from lit_latent.embedded.train import RECOMPUTE_WEIGHT, VERDICT_WEIGHT, ExampleStream

    _, tok = shipped
    stream = ExampleStream(tok, seed=0)
    exs = stream.encode([("recompute", "Work out 12 + 5 column by column, last digits first: 2 5, 1 0.", "2 5 7 0, 1 0 1 0"),
                         ("step", "Check this calculation: 12 + 5 = 17\nIs it right? Answer yes or no.", "yes")])
    batch = stream.collate(exs)
    (_, p0, a0), (_, p1, _) = exs
    assert batch["is_recompute"].tolist() == [True, False] and batch["is_check"].tolist() == [False, True]
    # every token of the worked answer (and eos) weighs RECOMPUTE_WEIGHT; a verdict VERDICT_WEIGHT
    assert batch["weights"][0, len(p0): len(p0) + len(a0)].tolist() == [RECOMPUTE_WEIGHT] * len(a0)
    assert len(a0) == 17  # 2 groups of 7 tokens, ", " between them, eos
    assert batch["weights"][1, len(p1)] == VERDICT_WEIGHT and batch["weights"][0, : len(p0)].sum() == 0


def test_final_check_answers_carry_their_own_loss_weight(shipped):
    from lit_latent.embedded.train import FINAL_WEIGHT, ExampleStream

    _, tok = shipped
    stream = ExampleStream(tok, seed=0)
    exs = stream.encode([("final", "Calculation lines:\n12 + 5 = 17\nWhat is the result of the last line?", "17")])
    batch = stream.collate(exs)
    (_, p, a), = exs
    assert batch["is_final"].tolist() == [True] and batch["is_check"].tolist() == [False]
    assert len(a) == 3 and a[-1] == tok.eos_token_id  # two digits and eos, each FINAL_WEIGHT
    assert batch["weights"][0, len(p): len(p) + len(a)].tolist() == [FINAL_WEIGHT] * 3


def test_batches_are_padded_to_a_multiple_of_16_tokens_within_the_token_budget(shipped):
    from itertools import islice

    from lit_latent.embedded.train import ExampleStream

    _, tok = shipped
    for batch in islice(iter(ExampleStream(tok, seed=0, max_tokens=2048, pool=64)), 6):
        rows, width = batch["input_ids"].shape
        longest = int(batch["attention_mask"].sum(1).max())
        assert width % 16 == 0 and longest <= width < longest + 16
        assert rows * width <= 2048 or rows == 1  # the budget counts the padded width


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_evaluate_refuses_a_count_below_one_in_one_line(value, capsys):
    from lit_latent.embedded.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--n-checks", value])
    assert exit_info.value.code == 2
    assert "--n-checks: must be a whole number >= 1" in capsys.readouterr().err
