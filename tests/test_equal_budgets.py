"""benchmarks/equal_budgets.py: every run it starts is a valid config, and its slices hold
exactly the split's problems."""

import importlib.util
import json
from pathlib import Path

import pytest

from lit_latent.cli import load_config, parse_args
from lit_latent.config import AdaptConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("equal_budgets", ROOT / "benchmarks" / "equal_budgets.py")
equal_budgets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(equal_budgets)


@pytest.mark.parametrize("name", list(equal_budgets.RUNS))
def test_every_run_is_a_valid_config_with_latentseeks_reward(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    files, overrides, _ = parse_args(equal_budgets.RUNS[name])
    cfg = load_config(AdaptConfig, files, overrides)
    seek = load_config(AdaptConfig, ["configs/latentseek.yaml"], [])
    if cfg.method != "cot" and name not in equal_budgets.OWN_REWARD:  # the same reward and stopping rule for every searching method
        assert cfg.reward == seek.reward
        search = cfg.evolve if cfg.method == "latentevolve" else cfg.latent
        assert search.stop_threshold == seek.latent.stop_threshold


def test_a_slice_holds_the_splits_problems_in_file_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: cot\n")
    ids = [json.loads(line)["id"] for line in (ROOT / "lit_latent/embedded/heldout.jsonl").read_text().splitlines()[:12]]
    (run / "predictions.jsonl").write_text("".join(json.dumps({"id": i, "correct": True, "tokens": 1}) + "\n" for i in reversed(ids)))
    sliced = equal_budgets.slice_run(run, 4, 5, tmp_path / "slice")
    kept = [json.loads(line)["id"] for line in (sliced / "predictions.jsonl").read_text().splitlines()]
    assert sorted(kept) == sorted(ids[4:9]) and (sliced / "config.yaml").read_text() == "method: cot\n"
    with pytest.raises(SystemExit, match="holds 8 of the 10 problems 5-14"):
        equal_budgets.slice_run(run, 4, 10, tmp_path / "slice")
