"""lit_latent.report: aggregation on hand-made records, and the CLI on hand-made run folders."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_latent.report import aggregate, budget_curve, by_iteration, main, stopping_points, token_budgets, under_budget
from lit_latent.runs import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def plain(correct, tokens=10, seconds=0.5):
    return {"method": "cot", "correct": correct, "tokens": tokens, "seconds": seconds}


def adaptive(rewards, corrects, tokens=100):
    """A LatentSeek record: rewards[0] / corrects[0] are the initial answer's, one candidate per later entry."""
    return {
        "method": "latentseek", "correct": corrects[-1], "tokens": tokens, "seconds": 2.0,
        "initial_correct": corrects[0], "iterations": len(rewards) - 1, "rewards": rewards,
        "candidates": [{"reward": r, "correct": c, "answer": None, "tokens": 1, "output": ""} for r, c in zip(rewards[1:], corrects[1:])],
    }


def test_aggregate_half_right_of_100():
    records = [plain(i % 2 == 0, tokens=i, seconds=1.0) for i in range(100)]
    agg = aggregate(records)
    assert agg["n"] == 100 and agg["correct"] == 50 and agg["accuracy"] == 0.5
    lo, hi = agg["accuracy_ci95"]
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert agg["tokens_per_problem"] == pytest.approx(49.5)
    assert agg["seconds_per_problem"] == pytest.approx(1.0)
    assert "initial_accuracy" not in agg and "mean_iterations" not in agg


def test_aggregate_adaptive_records():
    records = [
        adaptive([0.2, 0.5, 0.9], [False, False, True], tokens=30),  # fixed after 2 iterations
        adaptive([0.9], [True], tokens=10),                            # passed at once
        adaptive([0.1, 0.3, 0.6, 0.4], [True, False, False, False], tokens=50),  # broken
    ]
    agg = aggregate(records)
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["correct"] == 2
    assert agg["initial_accuracy"] == pytest.approx(2 / 3)
    assert agg["mean_iterations"] == pytest.approx((2 + 0 + 3) / 3)
    assert agg["tokens_per_problem"] == pytest.approx(30)
    assert (agg["fixed"], agg["broken"]) == (1, 1)


def test_by_iteration_keeps_the_last_value_of_a_stopped_problem():
    records = [
        adaptive([0.2, 0.5, 0.9], [False, False, True]),
        adaptive([0.9], [True]),
        adaptive([0.0, 0.3, 0.6, 0.3], [False, False, True, False]),
        plain(True),  # not adaptive: left out
    ]
    reward, accuracy = by_iteration(records)
    assert reward == pytest.approx([(0.2 + 0.9 + 0.0) / 3, (0.5 + 0.9 + 0.3) / 3, (0.9 + 0.9 + 0.6) / 3, (0.9 + 0.9 + 0.3) / 3])
    assert accuracy == pytest.approx([1 / 3, 1 / 3, 1.0, 2 / 3])
    assert accuracy[-1] == aggregate(records[:3])["accuracy"]  # the last index is the final accuracy
    assert by_iteration([plain(True), plain(False)]) == ([], [])


def costed(rewards, corrects, tokens, generations=None, initial=50):
    """An adaptive record whose candidates cost ``tokens[k]`` tokens and ``generations[k]`` tries."""
    record = adaptive(rewards, corrects, tokens=initial + sum(tokens))
    for c, t, g in zip(record["candidates"], tokens, generations or [1] * len(tokens)):
        c.update(tokens=t, generations=g)
    return record


def test_stopping_points_follow_the_answer_rule_and_end_at_the_record():
    # the second candidate is right but scores under the first: "best" keeps the first
    record = costed([0.2, 0.6, 0.4, 0.9], [False, False, True, True], tokens=[30, 0, 20], generations=[1, 0, 1])
    assert stopping_points(record, "last") == [(50, 1, False), (80, 2, False), (80, 2, True), (100, 3, True)]
    assert stopping_points(record, "best") == [(50, 1, False), (80, 2, False), (80, 2, False), (100, 3, True)]
    record["correct"] = False  # as choose_best would have it with the last candidate worse
    record["rewards"][-1] = record["candidates"][-1]["reward"] = 0.5
    assert stopping_points(record, "best")[-1] == (100, 3, False)
    assert stopping_points(plain(True, tokens=7), "last") == [(7, 1, True)]
    assert stopping_points(dict(plain(False, tokens=80), samples=[{}] * 8), "last") == [(80, 8, False)]
    evolve = dict(costed([0.5, 0.7], [False, False], tokens=[40]), method="latentevolve", correct=True, tokens=120)
    evolve["rewards"] = [0.5, 0.7]  # LatentEvolve's rewards are the steps' means: two points only
    assert stopping_points(evolve, "last") == [(80, 1, False), (120, 2, True)]
    # LatentEvolve's greedy day (evolve.samples=1) decides its candidates one by one, as LatentSeek does
    assert stopping_points(dict(record, method="latentevolve"), "best", one_by_one=True) == stopping_points(record, "best")


def test_a_greedy_latentevolve_run_is_cut_candidate_by_candidate_like_latentseek(tmp_path):
    from lit_latent.report import load_run

    record = costed([0.2, 0.6, 0.4, 0.9], [False, False, True, True], tokens=[30, 0, 20], generations=[1, 0, 1])
    for name, config in (("seek", "method: latentseek\nlatent: {answer: best}\n"),
                         ("greedy", "method: latentevolve\nevolve: {samples: 1, answer: best}\n"),
                         ("sampled", "method: latentevolve\nevolve: {samples: 8, answer: best}\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config)
        (tmp_path / name / "predictions.jsonl").write_text(json.dumps(dict(record, id="a", method=config.split()[1])) + "\n")
    seek, greedy, sampled = (load_run(tmp_path / n)["points"] for n in ("seek", "greedy", "sampled"))
    assert greedy == seek == [[(50, 1, False), (80, 2, False), (80, 2, False), (100, 3, True)]]
    assert sampled == [[(50, 1, False), (100, 3, True)]]


def test_under_budget_cuts_each_problem_where_its_next_candidate_would_pass_it():
    records = [costed([0.0, 1.0], [False, True], tokens=[40]),                  # right at 90 tokens, 2 tries
               costed([0.0, 0.0, 1.0], [False, False, True], tokens=[10, 10]),  # right at 70, 3 tries
               costed([1.0], [True], tokens=[], initial=120)]                     # right, but its first answer costs 120
    points = [stopping_points(r, "last") for r in records]
    assert under_budget(points, 60, "tokens") == (0.0, (50 + 60 + 0) / 3)
    assert under_budget(points, 90, "tokens") == (2 / 3, (90 + 70 + 0) / 3)
    assert under_budget(points, 120, "tokens") == (1.0, (90 + 70 + 120) / 3)
    assert under_budget(points, 2, "tries") == (2 / 3, (2 + 2 + 1) / 3)
    assert under_budget(points, 3, "tries") == (1.0, (2 + 3 + 1) / 3)
    xs, ys = budget_curve(points, "tokens")
    assert xs == sorted(xs) and ys[-1] == 100.0 and len(xs) == 5  # budgets 50, 60, 70, 90, 120
    assert token_budgets([{"points": points}], count=3) == [50, 77, 120]  # median first answer 50 -> 90th percentile of full spend 120


def make_run(path: Path, config: str, records: list) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def two_runs(tmp_path):
    data = "data:\n  path: ../shared/data/gsm8k_test.jsonl\n"
    cot = make_run(tmp_path / "cot", "method: cot\n" + data + "reward:\n  kind: self\n", [plain(i < 2) for i in range(4)])
    seek = make_run(tmp_path / "seek", "method: latentseek\n" + data + "reward:\n  kind: verifier\n",
                    [dict(adaptive([0.0, 1.0], [False, True]), reward_uses_labels=True), adaptive([1.0], [True]),
                     adaptive([0.0, 0.0, 0.0], [False, False, False]), adaptive([0.0, 1.0], [True, True])])
    return cot, seek


def test_cli_writes_the_table_and_both_plots(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_entry_point(main, [*map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    first = md.split("## At equal budgets")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in first.splitlines() if line.startswith("| ")}
    assert rows["cot"][1:] == ["cot", "gsm8k_test", "-", "4", "50.0 (15.0-85.0)", "-", "-", "10", "0.50"]
    assert rows["seek"][1:] == ["latentseek", "gsm8k_test", "verifier (gold labels)", "4", "75.0 (30.1-95.4)", "50.0", "1.00", "100", "2.00"]
    assert "| cot " in printed and "| seek " in printed
    assert "| run  | <= " in printed and "| <= 1 tries |" in printed
    budgets = [line for line in md.split("## At equal budgets")[1].splitlines() if line.startswith("| seek")]
    # seek at 1 try: its initial answers (2 of 4 right); at 2 tries: one more fixed (its last candidate)
    assert [c.strip() for c in budgets[0].split("|")[1:-1]][-5:] == ["50.0", "75.0", "75.0", "75.0", "75.0"]
    for name in ("accuracy.png", "iterations.png", "budgets.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_cli_default_out_is_the_first_run_and_no_curve_without_adaptive_runs(two_runs):
    cot, _ = two_runs
    assert run_entry_point(main, [str(cot)]) == 0
    assert (cot / "report.md").is_file() and (cot / "accuracy.png").is_file()
    assert not (cot / "iterations.png").exists()


def test_a_folder_without_predictions_is_one_line_and_exit_2(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_entry_point(main, [str(two_runs[0]), str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {empty}: no predictions.jsonl (not a run folder of adapt.py?)"
    assert not (two_runs[0] / "report.md").exists()  # nothing written before every folder is checked


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_latent.report", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: not a directory"
