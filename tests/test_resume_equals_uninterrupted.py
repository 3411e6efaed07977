"""A LatentEvolve run killed at chosen moments (mid-day, mid-night, between a batch's records and
its memory commit) and resumed each time gives the records, memory and nights of the run that
was never killed. The kill is an exception no handler catches, raised in-process at a chosen
call: deterministic, and what it leaves on disk is what a SIGKILL at that moment leaves."""

import json
from pathlib import Path

import pytest
import torch

import adapt
import callbacks.writer
import lit_latent.weaver
from lit_latent.memory import EpisodicMemory
from lit_latent.results import read_records

ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the run catches it."""


@pytest.fixture()
def eight_problems(tmp_path):
    path = tmp_path / "eight.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "problem": f"{i} times 2?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    return path


def evolve_args(model_dir, data, run_dir):
    # batches of 2, a night every 4 problems (after batches 2 and 4); half the problems archived
    return ["--config", str(ROOT / "configs" / "latentevolve.yaml"), f"model.path={model_dir}", f"data.path={data}",
            f"run_dir={run_dir}", "generation.max_new_tokens=6", "evolve.samples=2", "evolve.max_steps=2",
            "evolve.latent_count=3", "data.batch_size=2", "trainer.accelerator=cpu", "reward.kind=custom",
            "reward.class_path=custom_rewards.IdReward", "reward.kwargs.good=[e0,e1,e3,e4,e6]",
            "evolve.baseline=none", "weaver.max_epochs=2", "evolve.night_every=4", "data.limit=null"]


def kill_at(monkeypatch, target, name: str, call: int, after: bool):
    """Make the ``call``-th call of ``target.name`` raise Killed, before or after doing its work."""
    real = getattr(target, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not after:
            raise Killed(name)
        result = real(*args, **kwargs)
        if calls[0] == call and after:
            raise Killed(name)
        return result

    monkeypatch.setattr(target, name, wrapped)


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_records(run_dir / "predictions.jsonl")]


def state(run_dir: Path):
    memory = EpisodicMemory.open(run_dir / "memory")
    nights = json.loads((run_dir / "weaver" / "nights.json").read_text())
    weavers = {p.parent.name: p.read_bytes() for p in sorted((run_dir / "weaver").glob("night-*/weaver.safetensors"))}
    return records(run_dir), memory, [{k: v for k, v in n.items() if k != "checkpoint"} for n in nights], weavers


def test_a_run_killed_mid_day_and_mid_night_resumes_to_the_uninterrupted_run(tiny_model_dir, eight_problems, tmp_path, capsys):
    whole = tmp_path / "whole"
    adapt.main(evolve_args(tiny_model_dir, eight_problems, whole))

    run = tmp_path / "killed"
    args = evolve_args(tiny_model_dir, eight_problems, run)
    kills = [
        # mid-day: batch 2 archived (pending) and night 1 fitted and logged, then killed before its records
        (callbacks.writer, "append_records", 2, False),
        # batch 3's records written (batch 2 redone, night 1 again), killed before its memory entries were committed
        (callbacks.writer, "append_records", 2, True),
        # mid-night: night 2's fit trained, killed before it saved (its checkpoints are left behind)
        (lit_latent.weaver, "save_weaver", 1, False),
    ]
    for target, name, call, after in kills:
        with pytest.MonkeyPatch.context() as mp:
            kill_at(mp, target, name, call, after)
            with pytest.raises(Killed):
                adapt.main(args)
    adapt.main(args)
    assert records(run) == records(whole)  # every record, field by field (timings aside), in the same order
    out = capsys.readouterr().out
    assert "dropped the pending entries" in out and "resuming after night 1" in out

    want, got = state(whole), state(run)
    assert got[1].ids == want[1].ids and got[1].scores == want[1].scores
    assert got[1].ids == [r["id"] for r in want[0] if r["archived"]]  # no entry without a record
    for a, b in zip(got[1].tensors(), want[1].tensors()):
        assert torch.equal(a, b)
    assert got[2] == want[2] and len(got[2]) == 2  # the same two nights, counted on from the resume
    assert got[3] == want[3]  # and the same weavers: night-001 was not overwritten by another
