"""Reward scoring functions and their construction from the config."""

import pytest

from lit_latent.rewards import (
    MajorityReward,
    SelfReward,
    Scores,
    VerifierReward,
    check_prompts,
    combine_verdicts,
    make_reward,
    unverifiable_lines,
)
from lit_latent.config import SCHEME_WEIGHTS, RewardConfig, UserError
from lit_latent.prompts import (
    FINAL_CHECK_TOKENS,
    final_check_answer,
    final_check_prompt,
    final_check_values,
    parse_final_check,
    parse_recomputed,
    parse_verdict,
    recompute_answer,
    recompute_prompt,
    recompute_question,
)


@pytest.mark.parametrize(
    "text, expected",
    [("yes", True), (" Yes.", True), ("no", False), ("NO, the second line is wrong", False),
     ("", None), ("maybe", None), ("The answer is yes", None), ("yesterday", None)],
)
def test_verdict_is_parsed_from_the_start_of_the_continuation_only(text, expected):
    assert parse_verdict(text) is expected


def test_combine_verdicts_weights_and_missing_verdicts_fail():
    w = SCHEME_WEIGHTS["latentseek"]  # calculation 2, answer 1, complete 2, understood 1
    all_yes = {"calculation": [True], "answer": [True], "complete": [True], "understood": [True]}
    assert combine_verdicts(all_yes, w) == 1.0
    assert combine_verdicts({**all_yes, "calculation": [True, False]}, w) == pytest.approx(1 - 2 / 6)
    assert combine_verdicts({**all_yes, "answer": [None]}, w) == pytest.approx(1 - 1 / 6)  # unparseable = failed
    assert combine_verdicts({**all_yes, "calculation": []}, w) == pytest.approx(1 - 2 / 6)  # no line to check
    assert combine_verdicts({}, w) == 0.0
    evolve = SCHEME_WEIGHTS["latentevolve"]
    assert sum(evolve.values()) == 7 and evolve["format"] == evolve["clarity"] == 2


def test_steps_scheme_asks_each_calculation_line():
    solution = "3 × 4 = 12\n12 + 5 = 17\nThe answer is \\boxed{17}."
    triples = check_prompts("steps", "a problem", solution, list(SCHEME_WEIGHTS["steps"]))
    calc = [m for c, m, _ in triples if c == "calculation"]
    assert len(calc) == 2 and "3 × 4 = 12" in calc[0] and "12 + 5 = 17" in calc[1]
    assert [c for c, _, _ in triples].count("answer") == 1
    judges = {c: j for c, _, j in triples}
    assert judges["calculation"] is parse_verdict and judges["complete"] is parse_verdict  # yes/no questions
    assert judges["answer"]("17") is True and judges["answer"]("18") is False  # a number compared with the box


def test_final_check_asks_for_the_last_result_and_compares_it_with_the_box():
    right = "3 × 4 = 12\n12 + 156 = 168\nThe answer is \\boxed{168}."
    wrong = right.replace("{168}", "{170}")
    assert final_check_values(wrong) == ("168", "170")
    # the calculation lines only: the answer sentence (and its box) is not shown, so it cannot be copied
    assert final_check_prompt(wrong) == final_check_prompt(right) == (
        "Calculation lines:\n3 × 4 = 12\n12 + 156 = 168\nWhat is the result of the last line?")
    assert final_check_answer(right) == final_check_answer(wrong) == "168"
    assert parse_final_check("168", right) is True and parse_final_check(" 168", right) is True
    assert parse_final_check("168", wrong) is False
    assert parse_final_check("170", wrong) is True  # the model's slip: the check is only as good as its copy
    assert parse_final_check("", right) is None
    assert parse_final_check("The result is 168.", right) is True  # a chat model's sentence
    assert parse_final_check("The result is 170.", right) is False
    assert parse_final_check("1,680", "12 × 140 = 1680\nThe answer is \\boxed{1680}.") is True
    assert parse_final_check("168", "3 × 4 = 12\n12 + 156 = 168\nThe answer is 168.") is False  # no box
    assert final_check_values("12 + 5 = 17\n\\boxed{1 7}") == ("17", "17")  # spaces do not count
    no_lines = "so 17 apples\n\\boxed{17}"
    assert final_check_prompt(no_lines).startswith("Calculation lines:\nnone\n") and final_check_answer(no_lines) == "none"
    assert parse_final_check("none", no_lines) is False


def test_final_check_reads_the_last_box_with_nested_braces_as_the_answer_checker_does():
    # a real model's LaTeX: a flat pattern finds no box in \boxed{\text{12}} and fails it
    assert final_check_values("6 × 2 = 12\nThe answer is \\boxed{\\text{12}}.") == ("12", "\\text{12}")
    assert final_check_values("The answer is \\boxed{\\frac{1}{2}}.") == (None, "\\frac{1}{2}")
    assert final_check_values("7 - 2 = 5\nfirst \\boxed{4}, then \\boxed{5}")[1] == "5"  # the last box counts
    assert final_check_values("7 - 2 = 5\n\\boxed{5} and \\boxed{6")[1] == "5"  # a box cut off by the budget is skipped
    assert parse_final_check("5", "7 - 2 = 5\nThe answer is \\boxed{{5}}.") is False  # {5} is not 5 as text


def copy_last_result(message):
    """What the trained model writes for a final check: the last calculation line's result."""
    return message.splitlines()[-2].split("= ")[-1]


class FakeModule:
    """Answers verification prompts from a script, as the model would; final checks by copying
    the last line's result."""

    def __init__(self, answer):
        self.answer = answer
        self.asked = []

    def complete(self, messages, max_new_tokens):
        self.asked += messages
        self.max_new_tokens = max_new_tokens
        texts = [copy_last_result(m) if m.startswith("Calculation lines:") else self.answer(m) for m in messages]
        return texts, [2] * len(messages)


def test_self_reward_one_batched_call_and_the_prompt_never_counts_as_a_verdict():
    module = FakeModule(lambda m: "no" if m.startswith("Check this calculation: 12 + 5 = 18") else "yes")
    reward = SelfReward("steps")
    problems = [{"id": "a", "problem": "p", "answer": "17"}, {"id": "b", "problem": "p", "answer": "17"}]
    good = "3 × 4 = 12\n12 + 5 = 17\nThe answer is \\boxed{17}."
    bad = "3 × 4 = 12\n12 + 5 = 18\nThe answer is \\boxed{18}."
    scores = reward.score(module, problems, [good, bad])
    assert scores.rewards == [1.0, pytest.approx(1 - 2 / 6)]
    assert scores.tokens == [2 * 5, 2 * 5]  # 2 lines + answer + complete + understood, 2 tokens each
    # every prompt asks for a verdict ("Answer yes or no."): a model echoing nothing useful fails every check
    silent = SelfReward("latentseek").score(FakeModule(lambda m: ""), problems[:1], [good])
    assert silent.rewards == [0.0]


def test_weights_override_and_unknown_criterion():
    assert SelfReward("latentseek", {"answer": 3}).weights["answer"] == 3.0
    with pytest.raises(UserError, match="reward.weights.nonsense"):
        SelfReward("latentseek", {"nonsense": 1})
    with pytest.raises(UserError, match="reward.weights.answer"):
        SelfReward("latentseek", {"answer": -1})
    with pytest.raises(UserError, match="reward.weights: every criterion"):
        SelfReward("recompute", {c: 0 for c in ("calculation", "answer", "complete", "understood")})


def test_a_criterion_of_weight_zero_is_not_asked_and_does_not_count():
    problems = [{"id": "a", "problem": "p", "answer": "17"}]
    good = "3 × 4 = 12\n12 + 5 = 17\nThe answer is \\boxed{17}."
    module = _recomputing_module({})
    recompute = module.answer
    # the holistic checks fail a right solution, as the embedded v4 model's mostly do
    module.answer = lambda m: "no" if recompute(m) == "yes" else recompute(m)
    full = SelfReward("recompute").score(module, problems, [good])
    asked_full = len(module.asked)
    assert full.rewards == [pytest.approx(1 - 3 / 6)]  # complete (2) and understood (1) fail
    module.asked = []
    lines_only = SelfReward("recompute", {"complete": 0, "understood": 0}).score(module, problems, [good])
    assert lines_only.rewards == [1.0]
    assert len(module.asked) == asked_full - 2 and set(lines_only.details[0]) == {"calculation", "answer"}


def test_verifier_uses_labels_and_majority_votes():
    problems = [{"id": "a", "problem": "p", "answer": "1/2", "choices": None}]
    assert VerifierReward().score(None, problems, ["so \\boxed{0.5}"]).rewards == [1.0]
    assert VerifierReward.uses_labels and not MajorityReward.uses_labels

    class Sampler:
        def sample_answers(self, problems, n, tag):
            return ["\\boxed{3}", "\\boxed{4}", "\\boxed{3}"], [5, 5, 5]

    majority = MajorityReward(3)
    s = majority.score(Sampler(), problems, ["\\boxed{3}"])
    assert s.rewards == [1.0] and s.tokens == [15]
    s = majority.score(Sampler(), problems, ["\\boxed{4}"])  # the vote is cached: no new cost
    assert s.rewards == [0.0] and s.tokens == [0]


def test_custom_reward_by_import_path():
    reward = make_reward(RewardConfig(kind="custom", class_path="custom_rewards.PassAfterReward", kwargs={"n": 2}))
    assert type(reward).__name__ == "PassAfterReward" and reward.n == 2
    with pytest.raises(UserError, match="cannot import"):
        make_reward(RewardConfig(kind="custom", class_path="custom_rewards.Nope"))
    with pytest.raises(UserError, match="not a subclass"):
        make_reward(RewardConfig(kind="custom", class_path="lit_latent.config.RewardConfig"))
    with pytest.raises(UserError, match="reward.kwargs"):
        make_reward(RewardConfig(kind="custom", class_path="custom_rewards.PassAfterReward", kwargs={"m": 1}))
    assert isinstance(make_reward(RewardConfig(kind="verifier")), VerifierReward)
    assert isinstance(Scores([1.0], [0]).details, list)


def test_steps_scheme_fails_lines_it_cannot_ask_about():
    # a latent edit left "31 ×  = 9": it is not one calculation, so it fails instead of being skipped
    garbled = "31 ×  = 9\n9 + 16 = 25\nThe answer is \\boxed{25}."
    module = FakeModule(lambda m: "yes")
    scores = SelfReward("steps").score(module, [{"id": "p", "problem": "a problem", "answer": "25"}], [garbled])
    assert scores.details[0]["calculation"] == [1, 0]
    assert scores.rewards[0] == pytest.approx(1 - 2 / 6)
    clean = SelfReward("steps").score(module, [{"id": "p", "problem": "a problem", "answer": "25"}],
                                      ["9 + 16 = 25\nThe answer is \\boxed{25}."])
    assert clean.rewards[0] == 1.0


def test_self_reward_and_training_labels_agree_on_what_the_answer_line_is():
    # one rule (prompts.is_answer_line) for both: the closing sentence is never a failed step
    from lit_latent.embedded.checks import holistic_label
    from lit_latent.prompts import is_answer_line

    problem = {"id": "p", "problem": "Tom has 9 apples and gets 16 more.", "answer": "25", "steps": 1}
    for closing in ("The answer is \\boxed{25}.", "So the Answer is 25.", "\\boxed{25}"):
        solution = f"9 + 16 = 25\n{closing}"
        assert is_answer_line(closing)
        assert unverifiable_lines(solution) == 0
        assert holistic_label("calculation", problem, solution) is True
    assert not is_answer_line("9 + 16 = 25") and unverifiable_lines("9 + 16 = 25\nso 25 apples") == 1


def test_recompute_questions_lay_out_the_lines_own_digits_in_columns():
    message, op, claimed = recompute_question("214 - 46 = 188")
    assert (op, claimed) == ("-", 188)
    assert message == "Work out 214 - 46 column by column, last digits first: 4 6, 1 4, 2 0."
    # a product pairs its one-digit factor with every digit of the other, whichever side it is on
    assert recompute_question("9 × 207 = 1863")[0].endswith("last digits first: 7 9, 0 9, 2 9.")
    # a whole-number division is right exactly when b × c gives back a
    assert recompute_question("990 ÷ 9 = 110") == (recompute_prompt(110, "×", 9), "×", 990)
    assert recompute_question("990 ÷ 110 = 9") == (recompute_prompt(110, "×", 9), "×", 990)
    # no column layout: decimals, prose, a product of two numbers of several digits
    for line in ("1.5 + 2 = 3.5", "so 25 apples", "12 × 15 = 180"):
        assert recompute_question(line) is None


@pytest.mark.parametrize("x, op, y", [(96, "+", 8), (110, "-", 34), (99, "×", 9), (5, "-", 5), (0, "+", 0), (907, "×", 7)])
def test_recompute_answer_works_each_column_and_parses_back_to_the_result(x, op, y):
    answer = recompute_answer(x, op, y)
    assert parse_recomputed(answer, op) == (x + y if op == "+" else x - y if op == "-" else x * y)


def test_recompute_answer_form():
    assert recompute_answer(96, "+", 8) == "6 8 4 1, 9 0 0 1"  # digits, result digit, carry
    assert recompute_answer(110, "-", 34) == "0 4 6 1, 1 3 7 1, 1 0 0 0"  # borrows
    assert recompute_answer(99, "×", 9) == "9 9 1 8, 9 9 9 8"
    # a difference ending in a borrow is negative: no whole-number result to compare
    assert parse_recomputed(recompute_answer(3, "-", 8), "-") is None
    for bad in ("", "yes", "6 8 4, 9 0 0 1", "6 8 4 1,9 0 0 1", "6 8 4 1, 9 0 0 1 and more"):
        assert parse_recomputed(bad, "+") is None
    assert parse_recomputed(" 6 8 4 1, 9 0 0 1", "+") == 104  # leading space of a continuation


def _recomputing_module(slip: dict):
    """Works recompute questions out column by column (the ``slip`` ones as scripted) and
    answers every yes/no question with yes."""
    import re

    def answer(message):
        m = re.match(r"Work out (\d+) (.) (\d+) column", message)
        if m is None:
            return "yes"
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return slip.get((a, op, b), recompute_answer(a, op, b))

    return FakeModule(answer)


def test_recompute_scheme_compares_the_models_recomputation_with_each_line():
    problems = [{"id": "a", "problem": "p", "answer": "17"}] * 3
    good = "3 × 4 = 12\n12 + 5 = 17\nThe answer is \\boxed{17}."
    bad = "3 × 4 = 12\n12 + 5 = 18\nThe answer is \\boxed{18}."
    division = "24 ÷ 2 = 12\n12 + 5 = 17\nThe answer is \\boxed{17}."
    module = _recomputing_module({})
    scores = SelfReward("recompute").score(module, problems, [good, bad, division])
    assert scores.rewards == [1.0, pytest.approx(1 - 2 / 6), 1.0]
    assert scores.details[1]["calculation"] == [1, 0]
    assert recompute_prompt(12, "×", 2) in module.asked
    # the model's own slip on a right line fails it: the check is only as good as the recomputation
    slipping = _recomputing_module({(12, "+", 5): "2 5 7 0, 1 0 2 0"})
    assert SelfReward("recompute").score(slipping, problems[:1], [good]).details[0]["calculation"] == [1, 0]
    # a line no recompute question fits fails, as in the steps scheme
    odd = SelfReward("recompute").score(module, problems[:1], ["1.5 + 2 = 3.5\n3.5 + 1 = 4.5\n\\boxed{4.5}"])
    assert odd.details[0]["calculation"] == [0, 0]
    # the final check compares the result the model copies with the box, with room to write it
    boxed_off = good.replace("{17}", "{71}")
    scores = SelfReward("recompute").score(module, problems[:1], [boxed_off])
    assert scores.details[0]["answer"] == [0] and scores.rewards == [pytest.approx(1 - 1 / 6)]
    assert module.max_new_tokens >= FINAL_CHECK_TOKENS
    # a model answering yes/no to a recompute question fails it
    assert SelfReward("recompute").score(FakeModule(lambda m: "yes"), problems[:1], [good]).rewards == [pytest.approx(1 - 2 / 6)]


@pytest.mark.parametrize("overrides, message", [
    (["reward.weights.nonsense=1"], "config key reward.weights.nonsense: not a criterion of scheme latentseek"),
    (["reward.weights.answer=-1"], "config key reward.weights.answer: must be >= 0, got -1.0"),
    (["reward.scheme=recompute", "reward.weights.calculation=0", "reward.weights.answer=0", "reward.weights.complete=0",
      "reward.weights.understood=0"], "config key reward.weights: every criterion of scheme recompute has weight 0"),
])
def test_reward_weights_are_checked_when_the_config_loads(overrides, message):
    # at load time, before any model is read: the same one-line errors SelfReward gives
    from lit_latent.cli import load_config
    from lit_latent.config import AdaptConfig

    with pytest.raises(UserError) as e:
        load_config(AdaptConfig, [], ["reward.kind=self", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)
    load_config(AdaptConfig, [], ["reward.kind=verifier", "reward.weights.nonsense=1"])  # only a self reward has criteria
