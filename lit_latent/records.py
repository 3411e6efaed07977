"""One record per problem, the same schema for every method.

Every method writes ``id, method, problem, gold, output, final_answer, correct, tokens,
status``. The adaptive ones (LatentSeek, LatentEvolve, resample) add the initial greedy
answer (``initial_output, initial_answer, initial_correct``), ``iterations``, ``generations`` (the
answers generated and scored after the initial one: a prefix tried before is reused, not
generated), ``rewards`` (one per iteration), ``candidates`` (one dict per iteration: reward,
answer, correct, tokens, generations, ...) and ``reward_uses_labels``. ``tokens`` counts every
generated token: answers and reward generations alike.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lit_latent.answers import extract_answer, is_equivalent
from lit_latent.data import num_choices


def judge(problem: dict, output: str) -> tuple[Optional[str], bool]:
    choices = num_choices(problem)
    answer = extract_answer(output, choices)
    return answer, is_equivalent(problem["answer"], answer, choices)


def new_record(problem: dict, method: str, output: str, tokens: int, truncated: bool = False) -> dict[str, Any]:
    answer, correct = judge(problem, output)
    return {
        "id": problem["id"],
        "method": method,
        "problem": problem["problem"],
        "gold": problem["answer"],
        "output": output,
        "final_answer": answer,
        "correct": correct,
        "tokens": tokens,
        "status": "prompt_truncated" if truncated else "ok",
    }


def adaptive_record(problem: dict, method: str, output: str, tokens: int, rewards: list[float], uses_labels: bool,
                    truncated: bool = False, verdicts: Optional[dict] = None) -> dict[str, Any]:
    """A record whose greedy ``output`` is the initial answer that candidates may replace;
    ``rewards`` starts the reward curve (the initial answer's reward, if it was scored)."""
    record = new_record(problem, method, output, tokens, truncated)
    record.update(
        initial_output=output,
        initial_answer=record["final_answer"],
        initial_correct=record["correct"],
        iterations=0,
        generations=0,
        rewards=rewards,
        candidates=[],
        reward_uses_labels=uses_labels,
    )
    if verdicts:
        record["initial_verdicts"] = verdicts
    return record


def add_candidate(record: dict, problem: dict, output: str, tokens: int, reward: float, latents: Optional[dict] = None,
                  generations: int = 1) -> None:
    """The newest candidate becomes the answer (the paper returns the last candidate).
    ``generations``: answers generated and scored for it now (0: it repeats one tried before)."""
    answer, correct = judge(problem, output)
    candidate = {"reward": reward, "answer": answer, "correct": correct, "tokens": tokens, "generations": generations, "output": output}
    candidate.update(latents or {})
    record["candidates"].append(candidate)
    record["rewards"].append(reward)
    record["iterations"] += 1
    record["generations"] += generations
    record["tokens"] += tokens
    record.update(output=output, final_answer=answer, correct=correct)


def choose_best(record: dict) -> None:
    """Answer with the highest-reward candidate (the initial answer counts; earliest on ties)."""
    options = [(record["rewards"][0], record["initial_output"], record["initial_answer"], record["initial_correct"])]
    options += [(c["reward"], c["output"], c["answer"], c["correct"]) for c in record["candidates"]]
    best = max(range(len(options)), key=lambda k: (options[k][0], -k))
    _, record["output"], record["final_answer"], record["correct"] = options[best]
    record["chosen_candidate"] = best


def numerical_error(record: dict, what: str, value) -> bool:
    """Flag a NaN/inf ``value`` in the record; True when it was not finite."""
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if math.isfinite(value):
        return False
    record["status"] = "numerical_error"
    record["numerical_error"] = f"non-finite {what} at iteration {record.get('iterations', 0) + 1}"
    return True
