"""adapt.py end to end on a tiny model directory: the run folder, resume, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import adapt
from conftest import write_sum_problems
from lit_latent.results import read_records, repair
from lit_latent.runs import run_entry_point

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def problems_file(tmp_path):
    return write_sum_problems(tmp_path / "problems.jsonl", 6)


def adapt_args(tiny_model_dir, problems_file, run_dir, *extra):
    return ["--config", str(ROOT / "configs" / "cot.yaml"), f"model.path={tiny_model_dir}", f"data.path={problems_file}",
            f"run_dir={run_dir}", "generation.max_new_tokens=6", "data.batch_size=4", "trainer.accelerator=cpu", *extra]


def test_cot_run_writes_the_run_folder(tiny_model_dir, problems_file, tmp_path):
    run_dir = tmp_path / "run"
    summary = adapt.main(adapt_args(tiny_model_dir, problems_file, run_dir))
    assert (run_dir / "config.yaml").read_text().startswith("method: cot")
    records = read_records(run_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"q{i}" for i in range(6)]
    for r in records:
        assert {"id", "problem", "gold", "output", "final_answer", "correct", "tokens", "seconds"} <= set(r)
        assert 1 <= r["tokens"] <= 6
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary and saved["n"] == 6 and saved["method"] == "cot"
    assert saved["accuracy"] == sum(r["correct"] for r in records) / 6


def test_rerun_resumes_and_redoes_a_partial_line(tiny_model_dir, problems_file, tmp_path):
    run_dir = tmp_path / "run"
    adapt.main(adapt_args(tiny_model_dir, problems_file, run_dir, "data.limit=3"))
    first = read_records(run_dir / "predictions.jsonl")
    # a killed run: half a record at the end
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write('{"id": "q3", "meth')
    summary = adapt.main(adapt_args(tiny_model_dir, problems_file, run_dir))
    records = read_records(run_dir / "predictions.jsonl")
    ids = [r["id"] for r in records]
    assert ids == [f"q{i}" for i in range(6)] and len(set(ids)) == 6
    assert records[:3] == first
    assert summary["n"] == 6
    # a third run has nothing to do and writes nothing twice
    adapt.main(adapt_args(tiny_model_dir, problems_file, run_dir))
    assert [r["id"] for r in read_records(run_dir / "predictions.jsonl")] == ids


def test_repair_cuts_only_the_broken_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x')
    assert repair(path) == 2
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.limt=2"], "unknown config key data.limt (did you mean data.limit?)"),
        (["model.path=/nonexistent/model"], "model.path: model directory not found: /nonexistent/model"),
        (["data.path=/nonexistent.jsonl"], "data.path: file not found: /nonexistent.jsonl"),
        (["latent.max_iterations=-1"], "latent.max_iterations: must be >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, problems_file, tmp_path, capsys, extra, message):
    rc = run_entry_point(adapt.main, adapt_args(tiny_model_dir, problems_file, tmp_path / "r", *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_model_dir_without_tokenizer(tmp_path, tiny_model_dir, problems_file, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    rc = run_entry_point(adapt.main, adapt_args(bare, problems_file, tmp_path / "r"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot load a tokenizer" in err and "\n" not in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "adapt.py"), "data.limt=2"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: command line: unknown config key data.limt (did you mean data.limit?)"


def test_gsm8k_limit_5_on_a_local_hf_model(tiny_model_dir, shared_data, tmp_path):
    path = shared_data / "gsm8k_test.jsonl"
    run_dir = tmp_path / "gsm"
    adapt.main(adapt_args(tiny_model_dir, path, run_dir, "data.limit=5"))
    assert len(read_records(run_dir / "predictions.jsonl")) == 5


def test_overlong_prompt_is_cut_with_a_status(tiny_model_dir, problems_file, tmp_path):
    run_dir = tmp_path / "cut"
    with pytest.warns(UserWarning, match="cut to data.max_prompt_tokens=20"):
        adapt.main(adapt_args(tiny_model_dir, problems_file, run_dir, "data.max_prompt_tokens=20", "data.limit=2"))
    records = read_records(run_dir / "predictions.jsonl")
    assert [r["status"] for r in records] == ["prompt_truncated", "prompt_truncated"]
    assert json.loads((run_dir / "summary.json").read_text())["statuses"] == {"prompt_truncated": 2}
