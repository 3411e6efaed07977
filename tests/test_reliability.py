"""Crash-resume under SIGKILL, clean stop on SIGTERM (subprocesses on a tiny model)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_latent.results import read_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def thirty_problems(tmp_path):
    path = tmp_path / "thirty.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i:02d}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(30)))
    return path


def command(tiny_model_dir, data, run_dir, *extra):
    return [sys.executable, str(ROOT / "adapt.py"), f"model.path={tiny_model_dir}", f"data.path={data}", f"run_dir={run_dir}",
            "data.limit=null", "reward.kind=verifier", "generation.max_new_tokens=12", "latent.max_iterations=3",
            "data.batch_size=1", "trainer.accelerator=cpu", *extra]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def start_and_wait(cmd, predictions: Path, timeout: float = 120):
    """Start a run and return it once it has written at least one new record."""
    before = lines(predictions)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while lines(predictions) <= before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


# latentseek's records go through the same writer as latentevolve's, which also has a memory to
# keep in step: the default run kills latentevolve, -m slow both (the default run stays under 5 min)
@pytest.mark.parametrize("method", [pytest.param("latentseek", marks=pytest.mark.slow), "latentevolve"])
def test_sigkill_at_random_moments_loses_nothing(tiny_model_dir, thirty_problems, tmp_path, method):
    run_dir = tmp_path / "run"
    predictions = run_dir / "predictions.jsonl"
    extra = ["method=latentevolve", "evolve.samples=2", "evolve.max_steps=2", "evolve.latent_count=2",
             "evolve.archive_threshold=0.0", "evolve.night_every=0"] if method == "latentevolve" else []
    cmd = command(tiny_model_dir, thirty_problems, run_dir, *extra)
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        proc = start_and_wait(cmd, predictions)
        if proc.poll() is not None:
            break  # finished before we could kill it
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    raw = predictions.read_text()
    assert raw.endswith("\n")
    ids = [json.loads(line)["id"] for line in raw.splitlines()]
    assert sorted(ids) == [f"q{i:02d}" for i in range(30)]  # every id exactly once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n"] == 30
    assert summary["accuracy"] == sum(r["correct"] for r in read_records(predictions)) / 30
    if method == "latentevolve":
        from lit_latent.memory import EpisodicMemory

        memory = EpisodicMemory.open(run_dir / "memory")
        assert len(memory.ids) == len(set(memory.ids)) == 30


def test_sigterm_stops_after_the_current_batch(tiny_model_dir, thirty_problems, tmp_path):
    run_dir = tmp_path / "run"
    predictions = run_dir / "predictions.jsonl"
    proc = start_and_wait(command(tiny_model_dir, thirty_problems, run_dir), predictions)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped on SIGTERM" in err and "rerun with the same run_dir" in err
    records = read_records(predictions)
    assert 0 < len(records) < 30 and predictions.read_text().endswith("\n")
    assert json.loads((run_dir / "summary.json").read_text())["n"] == len(records)
