"""Multi-device runs through Lightning's DDP strategy, 2 CPU processes (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

from lit_latent.results import read_records

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_processes_each_id_once_and_merges_like_one_process(tiny_model_dir, tmp_path):
    data = tmp_path / "seven.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "problem": f"{i} + {i} = ?", "answer": str(2 * i)}) + "\n" for i in range(7)))
    common = [sys.executable, str(ROOT / "adapt.py"), f"model.path={tiny_model_dir}", f"data.path={data}", "data.limit=null",
              "reward.kind=verifier", "generation.max_new_tokens=6", "latent.max_iterations=2", "data.batch_size=2",
              "trainer.accelerator=cpu"]
    ddp = subprocess.run(common + [f"run_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"], capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(common + [f"run_dir={tmp_path / 'single'}"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]

    merged = read_records(tmp_path / "ddp" / "predictions.jsonl")
    assert sorted(r["id"] for r in merged) == [f"d{i}" for i in range(7)]
    assert not list((tmp_path / "ddp").glob("predictions.rank*.jsonl"))
    by_id = {r["id"]: r for r in read_records(tmp_path / "single" / "predictions.jsonl")}
    for r in merged:
        assert r["output"] == by_id[r["id"]]["output"] and r["rewards"] == by_id[r["id"]]["rewards"]

    def timeless(path):
        return {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}

    assert timeless(tmp_path / "ddp" / "summary.json") == timeless(tmp_path / "single" / "summary.json")


def test_leftover_rank_files_count_as_done(tmp_path):
    from callbacks.writer import merge_rank_files

    (tmp_path / "predictions.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "predictions.rank0.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    (tmp_path / "predictions.rank1.jsonl").write_text('{"id": "c"}\n{"id": "d", "x')
    merge_rank_files(tmp_path)
    assert [r["id"] for r in read_records(tmp_path / "predictions.jsonl")] == ["a", "b", "c"]
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))
