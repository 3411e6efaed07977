"""The same seed gives byte-identical predictions.jsonl for every method, apart from timings."""

import json
from pathlib import Path

import pytest

import adapt

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "cot": ["method=cot"],
    "resample": ["method=resample"],
    "self_consistency": ["method=self_consistency", "generation.num_samples=3"],
    "best_of_n": ["method=best_of_n", "generation.num_samples=3"],
    "latentseek": ["method=latentseek"],
    # the default config edits greedy candidates (edit_from, reanchor): sampling needs them off
    "latentseek_samples": ["method=latentseek", "latent.samples=3", "latent.edit_from=start", "latent.reanchor=false"],
    "latentevolve": ["method=latentevolve", "evolve.samples=2", "evolve.max_steps=2", "evolve.latent_count=2",
                     "evolve.archive_threshold=0.0", "evolve.night_every=3", "weaver.max_epochs=2"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seed_same_bytes(tiny_model_dir, tmp_path, method):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"{i} + 4 = ?", "answer": str(i + 4)}) + "\n" for i in range(5)))

    def run(name):
        run_dir = tmp_path / name
        adapt.main([f"model.path={tiny_model_dir}", f"data.path={data}", f"run_dir={run_dir}", "data.limit=null",
                    "reward.kind=custom", "reward.class_path=custom_rewards.IdReward", "reward.kwargs.good=[s1,s3]",
                    "generation.max_new_tokens=6", "latent.max_iterations=2", "data.batch_size=2",
                    "trainer.accelerator=cpu", "seed=7", *METHODS[method]])
        lines = (run_dir / "predictions.jsonl").read_text().splitlines()
        # timings live in their own field; everything else must match byte for byte
        return [json.dumps({k: v for k, v in json.loads(line).items() if k != "seconds"}) for line in lines]

    assert run("a") == run("b")
