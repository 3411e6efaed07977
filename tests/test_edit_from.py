"""latent.edit_from=first_failing_line: only the latents from the first line the reward fails
are optimized; the chain before it stays as it is."""

import pytest

from lit_latent.config import UserError
from lit_latent.engine import Engine
from lit_latent.rewards import Scores, SelfReward, VerifierReward
from test_module import make_cfg
from test_perf import predict
from test_reanchor import ScriptedReward

RECOMPUTE = SelfReward("recompute", {"complete": 0, "understood": 0})


@pytest.mark.parametrize("solution, details, flawed_line", [
    ("4 + 3 = 7\n7 × 2 = 15\nThe answer is \\boxed{15}.", {"calculation": [1, 0], "answer": [1]}, "7 × 2 = 15"),
    ("4 + 3 = 8\n8 × 2 = 16\nThe answer is \\boxed{16}.", {"calculation": [0, 1], "answer": [1]}, "4 + 3 = 8"),
    # a line no check fits counts as failed, as the reward counts it
    ("4 + 3 = 7\nso 7 apples\n7 × 2 = 14\nThe answer is \\boxed{14}.", {"calculation": [1, 1, 0], "answer": [1]}, "so 7 apples"),
    # every line right, the final check failed: the answer line
    ("4 + 3 = 7\n7 × 2 = 14\nThe answer is \\boxed{15}.", {"calculation": [1, 1], "answer": [0]}, "The answer is"),
    ("4 + 3 = 7\n7 × 2 = 14\nThe answer is \\boxed{14}.", {"calculation": [1, 1], "answer": [1]}, None),
    ("4 + 3 = 7\n7 × 2 = 14\nThe answer is \\boxed{14}.", {"calculation": [1, None], "answer": [1]}, "7 × 2"),  # no verdict
])
def test_first_flaw_is_the_first_line_the_verdicts_fail(solution, details, flawed_line):
    at = RECOMPUTE.first_flaw(solution, details)
    assert (at is None) if flawed_line is None else solution[at:].startswith(flawed_line)
    assert SelfReward("steps").first_flaw(solution, details) == at
    assert VerifierReward().first_flaw(solution, details) is None  # no verdicts per line
    assert SelfReward("latentseek").first_flaw(solution, details) is None


def test_token_at_finds_the_token_writing_a_character(tiny_model, char_tokenizer):
    engine = Engine(tiny_model, char_tokenizer, make_cfg())
    tokens = char_tokenizer("ab\ncd", add_special_tokens=False)["input_ids"]
    assert [engine.token_at(tokens, k) for k in range(6)] == [0, 1, 2, 3, 4, 5]


class FlawAt(ScriptedReward):
    """Never passes; says every solution first goes wrong at character ``at``."""

    def __init__(self, at):
        super().__init__([0.0] * 20)
        self.at = at

    def first_flaw(self, completion, details):
        return self.at


@pytest.mark.parametrize("at", [3, 6])
def test_only_latents_from_the_flawed_line_move(tiny_model, char_tokenizer, at):
    cfg = make_cfg(max_latents=8, lr=0.5, rho=1.0, max_iterations=6, edit_from="first_failing_line",
                   regenerate_after_first_change=True)
    for r in predict(tiny_model, char_tokenizer, cfg, FlawAt(at), batch_size=3):
        prefixes = [c["latent_tokens"] for c in r["candidates"]]
        first = char_tokenizer(r["initial_output"], add_special_tokens=False)["input_ids"][:8]
        assert all(p[:at] == first[:at] for p in prefixes)  # the chain before the flaw never changes
        assert any(p[at:] != first[at:len(p)] for p in prefixes)  # the latents after it do


def test_edit_from_needs_greedy_candidates():
    with pytest.raises(UserError, match="latent.edit_from: .* latent.samples=1"):
        make_cfg(edit_from="first_failing_line", samples=4)
    with pytest.raises(UserError, match="latent.edit_from: 'line' is not one of"):
        make_cfg(edit_from="line")
