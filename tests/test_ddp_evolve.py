"""LatentEvolve under DDP, 2 CPU processes (gloo): one shared memory, one weaver per night, resume after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_latent.generation import model_id
from lit_latent.memory import EpisodicMemory
from lit_latent.results import read_records
from lit_latent.weaver import load_weaver, weights_sha256

ROOT = Path(__file__).resolve().parents[1]


def problems_file(tmp_path, n: int) -> Path:
    path = tmp_path / f"{n}.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "problem": f"{i} times 2?", "answer": str(2 * i)}) + "\n" for i in range(n)))
    return path


def ddp_evolve(model_dir, data: Path, run_dir: Path, *extra) -> list[str]:
    good = "[" + ",".join(f"e{i}" for i in range(100) if i % 3) + "]"  # two problems in three are archived
    return [sys.executable, str(ROOT / "adapt.py"), "--config", str(ROOT / "configs" / "latentevolve.yaml"),
            f"model.path={model_dir}", f"data.path={data}", "data.limit=null", f"run_dir={run_dir}",
            "generation.max_new_tokens=6", "evolve.samples=2", "evolve.max_steps=2", "evolve.latent_count=3",
            "reward.kind=custom", "reward.class_path=custom_rewards.IdReward", f"reward.kwargs.good={good}",
            "weaver.max_epochs=2", "evolve.night_every=10", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", *extra]


def env() -> dict:
    # custom_rewards lives in tests/; one thread per rank, as the ranks share the cores
    return os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def index(problem_id: str) -> int:
    return int(problem_id[1:])


def check_run_folder(run_dir: Path, n: int) -> list[dict]:
    """Every id recorded once, no rank file left, and a committed memory of exactly the archived problems."""
    records = read_records(run_dir / "predictions.jsonl")
    assert sorted(index(r["id"]) for r in records) == list(range(n))
    assert not list(run_dir.glob("predictions.rank*.jsonl"))
    memory = EpisodicMemory.open(run_dir / "memory")
    assert len(memory.ids) == len(set(memory.ids))
    assert set(memory.ids) == {r["id"] for r in records if r["archived"]}
    manifest = json.loads((run_dir / "memory" / "manifest.json").read_text())
    assert not any(shard.get("pending") for shard in manifest["shards"])
    return records


def test_two_ranks_retrieve_from_one_memory_and_load_one_weaver_per_night(tiny_model_dir, tmp_path):
    # 41 problems, batches of 3 on 2 ranks: 7 steps of 6; the sampler repeats e0 at the end of rank 1
    run_dir = tmp_path / "run"
    run = subprocess.run(ddp_evolve(tiny_model_dir, problems_file(tmp_path, 41), run_dir, "data.batch_size=3",
                                    "evolve.top_k=100"), capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = check_run_folder(run_dir, 41)

    # the memory grows by the union of both ranks' archives after each step: with top_k above the
    # memory's size a problem retrieves every problem archived in an earlier step, on either rank
    step = {r["id"]: index(r["id"]) // 2 // 3 for r in records}  # rank i % 2 holds problem i at position i // 2
    archived = {r["id"] for r in records if r["archived"]}
    retrieving = [r for r in records if "neighbours" in r]
    assert {index(r["id"]) % 2 for r in retrieving if step[r["id"]] >= 2} == {0, 1}
    for r in retrieving:
        assert sorted(r["neighbours"]) == sorted(a for a in archived if step[a] < step[r["id"]]), r["id"]

    # a night at the step that passes 10, 20, 30, 40 problems counted over both ranks; the last
    # step brings 5 new problems (41), not 6: the repeat of e0 is not counted
    nights = json.loads((run_dir / "weaver" / "nights.json").read_text())
    assert [n["after_problems"] for n in nights] == [12, 24, 30, 41]
    assert sorted(p.name for p in (run_dir / "weaver").glob("night-*")) == [f"night-{i:03d}" for i in range(1, 5)]
    assert re.findall(r"night \d+ after \d+", run.stdout) == [  # printed once, by rank 0 (the ranks share stdout)
        f"night {i} after {n['after_problems']}" for i, n in enumerate(nights, 1)]
    ident = model_id(tiny_model_dir)
    for n in nights:
        saved = weights_sha256(load_weaver(n["checkpoint"], 32, ident))
        assert n["weaver_sha256_by_rank"] == [saved, saved]  # what each rank loaded, reported by the rank


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def signal_rank_one(args: list[str], run_dir: Path, sig: int, after_records: int) -> tuple[int, str]:
    """Launch a 2-rank run, send ``sig`` to rank 1 (the process Lightning's launcher started) once
    it has written ``after_records`` records; the launch's exit code and stderr."""
    launch = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    rank1 = run_dir / "predictions.rank1.jsonl"
    deadline = time.monotonic() + 240
    while not (rank1.is_file() and len(read_records(rank1)) >= after_records) and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    children = child_pids(launch.pid)
    assert launch.poll() is None and children, "the run ended before a rank could be signalled"
    os.kill(children[0], sig)
    _, err = launch.communicate(timeout=120)
    return launch.returncode, err


def test_a_rank_killed_mid_run_leaves_a_run_the_rerun_completes_with_every_id_once(tiny_model_dir, tmp_path):
    data, run_dir = problems_file(tmp_path, 24), tmp_path / "run"
    args = ddp_evolve(tiny_model_dir, data, run_dir, "data.batch_size=2")
    returncode, err = signal_rank_one(args, run_dir, signal.SIGKILL, after_records=6)
    assert returncode == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and "another rank of this run stopped" in err, err[-2000:]
    assert "Traceback" not in err

    rerun = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    check_run_folder(run_dir, 24)
    nights = json.loads((run_dir / "weaver" / "nights.json").read_text())
    counts = [n["after_problems"] for n in nights]
    assert len(counts) == 2 and counts[0] < counts[1] <= 24  # one night per 10 problems, none twice
    assert sorted(p.name for p in (run_dir / "weaver").glob("night-*")) == ["night-001", "night-002"]
    assert all(len(set(n["weaver_sha256_by_rank"])) == 1 for n in nights)


def test_latentevolve_on_spawned_ranks_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    import adapt
    from lit_latent.runs import run_entry_point

    run_dir = tmp_path / "run"
    args = ddp_evolve(tiny_model_dir, problems_file(tmp_path, 4), run_dir, "trainer.strategy=ddp_spawn")[2:]
    assert run_entry_point(adapt.main, args) == 2  # refused before ranks are spawned: in this process
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key trainer.strategy:") and "ddp_spawn" in err and "\n" not in err
    assert not (run_dir / "predictions.jsonl").exists()


@pytest.mark.slow
def test_a_sigterm_to_one_rank_stops_both_after_the_same_batch_and_the_rerun_completes(tiny_model_dir, tmp_path):
    data, run_dir = problems_file(tmp_path, 24), tmp_path / "run"
    args = ddp_evolve(tiny_model_dir, data, run_dir, "data.batch_size=2")
    returncode, err = signal_rank_one(args, run_dir, signal.SIGTERM, after_records=4)  # rank 0 hears of it at the batch's end
    assert returncode == 130 and "stopped on a signal to another rank" in err, err[-2000:]
    # the same batch on both ranks: as many records each
    assert len(read_records(run_dir / "predictions.rank0.jsonl")) == len(read_records(run_dir / "predictions.rank1.jsonl")) < 12

    rerun = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_run_folder(run_dir, 24)
