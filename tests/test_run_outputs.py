"""What adaptive runs write, checked against the records themselves: logs/metrics.csv's reward
curves, and the resample method's stopping, rewards and answer rule, on the embedded model with
the verifier reward (reward 1 for a right answer, 0 otherwise)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import adapt
from lit_latent.embedded import HELDOUT_PATH
from lit_latent.results import read_records

ROOT = Path(__file__).resolve().parents[1]

# held-out problems on which the embedded model's greedy CoT is wrong (emb-0009: fixed by a later
# candidate; emb-0006: never within these budgets) or right (emb-0000). In batches of 2 the first
# batch mixes a problem that stops early with one that goes on, so a mean that does not carry the
# stopped problem's last reward forward shows up in metrics.csv
PROBLEMS = ["emb-0009", "emb-0006", "emb-0000"]


@pytest.fixture()
def problems_file(tmp_path):
    rows = {json.loads(line)["id"]: line for line in HELDOUT_PATH.read_text(encoding="utf-8").splitlines()}
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(rows[i] + "\n" for i in PROBLEMS), encoding="utf-8")
    return path


def run(config: str, problems_file: Path, run_dir: Path, *extra: str) -> list[dict]:
    adapt.main(["--config", str(ROOT / "configs" / config), "reward.kind=verifier", f"data.path={problems_file}",
                f"run_dir={run_dir}", "trainer.accelerator=cpu", *extra])
    return read_records(run_dir / "predictions.jsonl")


def answer_rule(run_dir: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml").latent.answer


def expected_answer(record: dict, rule: str) -> tuple[int, dict]:
    """(index, option) of the answer under latent.answer: 0 is the initial answer, k the k-th candidate.
    last: the newest candidate; best: the highest reward, the earliest on ties."""
    options = [{"reward": record["rewards"][0], "output": record["initial_output"], "answer": record["initial_answer"],
                "correct": record["initial_correct"]}] + record["candidates"]
    if rule == "last":
        k = len(options) - 1
    else:
        assert rule == "best", rule
        k = max(range(len(options)), key=lambda i: (options[i]["reward"], -i))
    return k, options[k]


def check_verifier_records(records: list[dict], max_iterations: int, rule: str) -> None:
    for r in records:
        assert r["rewards"][0] == (1.0 if r["initial_correct"] else 0.0), r["id"]
        assert r["iterations"] == len(r["candidates"]) == len(r["rewards"]) - 1, r["id"]
        assert [c["reward"] for c in r["candidates"]] == r["rewards"][1:], r["id"]
        for c in r["candidates"]:
            assert c["reward"] == (1.0 if c["correct"] else 0.0), (r["id"], c)
        # stop_threshold 0.8: a right answer (reward 1) ends the search, a wrong one (0) does not
        if r["initial_correct"]:
            assert r["iterations"] == 0, r["id"]
        else:
            right = [k for k, c in enumerate(r["candidates"]) if c["correct"]]
            if right:
                assert right == [r["iterations"] - 1], r["id"]  # the first right candidate is the last one
            else:
                assert r["iterations"] == max_iterations, r["id"]
        k, chosen = expected_answer(r, rule)
        assert (r["output"], r["final_answer"], r["correct"]) == (chosen["output"], chosen["answer"], chosen["correct"]), r["id"]
        if "chosen_candidate" in r:
            assert r["chosen_candidate"] == k, r["id"]


def check_metrics_csv(run_dir: Path, records: list[dict], batch_size: int) -> None:
    """One row per batch (step 0, 1, ...): reward_iter<k> is the batch's mean reward at iteration k,
    a problem that stopped earlier counting with its last reward."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    depth = max(len(r["rewards"]) for r in records)
    assert set(rows[0]) == {"step"} | {f"reward_iter{k}" for k in range(depth)}
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    assert [int(row["step"]) for row in rows] == list(range(len(batches)))
    for row, batch in zip(rows, batches):
        batch_depth = max(len(r["rewards"]) for r in batch)
        for k in range(depth):
            value = row[f"reward_iter{k}"]
            if k >= batch_depth:
                assert value == "", (row["step"], k)
                continue
            mean = sum(r["rewards"][min(k, len(r["rewards"]) - 1)] for r in batch) / len(batch)
            assert float(value) == pytest.approx(mean), (row["step"], k)


def test_latentseek_metrics_csv_holds_the_records_mean_reward_per_iteration(problems_file, tmp_path):
    run_dir = tmp_path / "seek"
    records = run("latentseek.yaml", problems_file, run_dir, "data.limit=3", "data.batch_size=2", "latent.max_iterations=3",
                  "generation.max_new_tokens=100")
    assert [r["id"] for r in records] == PROBLEMS
    # the run exercises every branch: right at once, fixed by a candidate, never fixed
    fixed, never, right = records
    assert not fixed["initial_correct"] and fixed["correct"] and fixed["iterations"] < 3
    assert not never["initial_correct"] and not never["correct"] and never["iterations"] == 3
    assert right["initial_correct"] and right["iterations"] == 0
    check_verifier_records(records, max_iterations=3, rule=answer_rule(run_dir))
    check_metrics_csv(run_dir, records, batch_size=2)


def test_resample_stops_at_a_right_answer_and_answers_by_the_config_s_rule(problems_file, tmp_path):
    run_dir = tmp_path / "resample"
    records = run("resample.yaml", problems_file, run_dir, "data.batch_size=4", "generation.max_new_tokens=100",
                  "latent.max_iterations=4")
    assert [r["id"] for r in records] == PROBLEMS and all(r["method"] == "resample" for r in records)
    rule = answer_rule(run_dir)
    assert rule == "best"  # configs/resample.yaml: latentseek.yaml's rule, the best-scored candidate
    check_verifier_records(records, max_iterations=4, rule=rule)
    by_id = {r["id"]: r for r in records}
    assert by_id["emb-0000"]["initial_correct"] and by_id["emb-0000"]["candidates"] == []
    fixed = [r for r in records if not r["initial_correct"] and r["correct"]]
    never = [r for r in records if not any(c["correct"] for c in r["candidates"]) and not r["initial_correct"]]
    assert fixed and never  # both kinds of wrong first answers are seen
    # a never-fixed problem answers with its initial answer under 'best' (all rewards tie at 0)
    assert all(r["output"] == r["initial_output"] and r["chosen_candidate"] == 0 for r in never)
    # candidates are fresh samples, not copies of the initial answer
    assert any(c["output"] != r["initial_output"] for r in records for c in r["candidates"])
    check_metrics_csv(run_dir, records, batch_size=4)
