"""Benchmark presets (configs/data/*.yaml): each validates, and runs end to end on a tiny model."""

import json
from pathlib import Path

import pytest

import adapt
from lit_latent.cli import load_config, to_yaml
from lit_latent.config import AdaptConfig
from lit_latent.results import read_records
from lit_latent.runs import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "data").glob("*.yaml"))
# preset -> the shared file it reads (None: no shared file)
SHARED_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "aime24": "aime24.jsonl",
                "aime25": None, "multiple_choice": None}


def test_the_presets_are_the_documented_ones():
    assert sorted(p.stem for p in PRESETS) == sorted(SHARED_FILES)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_after_a_method_config(preset, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(AdaptConfig, ["configs/latentseek.yaml", str(preset.relative_to(ROOT))], [])
    assert cfg.method == "latentseek"  # the preset leaves the method alone
    assert cfg.data.prompt == ("choice" if preset.stem == "multiple_choice" else "math")
    assert cfg.data.limit is None  # the whole benchmark, not latentseek.yaml's 100
    assert 256 <= cfg.generation.max_new_tokens <= 4096
    shared = SHARED_FILES[preset.stem]
    if shared:
        assert Path(cfg.data.path) == Path("..") / "shared" / "data" / shared
    text = preset.read_text()
    assert text.startswith("# ") and f"--config configs/data/{preset.name}" in text


def run_preset(tiny_model_dir, run_dir, preset, *extra):
    # generation.max_new_tokens after the preset: the preset's budget is for real models
    return adapt.main(["--config", "configs/cot.yaml", "--config", f"configs/data/{preset}.yaml", f"model.path={tiny_model_dir}",
                       "data.limit=3", "generation.max_new_tokens=4", f"run_dir={run_dir}", "trainer.accelerator=cpu", *extra])


@pytest.mark.parametrize("preset", [name for name, f in SHARED_FILES.items() if f])
def test_preset_runs_on_its_shared_file(preset, tiny_model_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets' paths are relative to the repo root
    shared = shared_data / SHARED_FILES[preset]
    summary = run_preset(tiny_model_dir, tmp_path / "run", preset)
    records = read_records(tmp_path / "run" / "predictions.jsonl")
    rows = [json.loads(line) for line in shared.read_text(encoding="utf-8").splitlines()][:3]
    assert [r["id"] for r in records] == [row["id"] for row in rows]
    assert [r["gold"] for r in records] == [row["answer"] for row in rows]
    assert all(1 <= r["tokens"] <= 4 for r in records)
    assert summary["n"] == 3


def test_preset_without_its_file_names_the_path(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if (ROOT / "data" / "aime25.jsonl").is_file():
        pytest.skip("data/aime25.jsonl is present")
    rc = run_entry_point(adapt.main, ["--config", "configs/cot.yaml", "--config", "configs/data/aime25.yaml", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.path: file not found: data/aime25.jsonl" in err and "\n" not in err


def test_multiple_choice_preset_answers_with_letters(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "mc.jsonl"
    rows = [
        {"id": "mc0", "problem": "Which is even?", "choices": ["3", "4", "5"], "answer": "B"},
        {"id": "mc1", "problem": "What is 2 + 2?", "choices": ["1", "2", "3", "4"], "answer": "D"},
        {"id": "mc2", "problem": "Which is a vowel?", "choices": ["a", "b"], "answer": "A"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_preset(tiny_model_dir, tmp_path / "run", "multiple_choice", f"data.path={path}")
    records = read_records(tmp_path / "run" / "predictions.jsonl")
    assert [r["id"] for r in records] == ["mc0", "mc1", "mc2"]
    for r, row in zip(records, rows):
        letters = "ABCD"[: len(row["choices"])]
        assert r["final_answer"] is None or r["final_answer"] in letters
        assert r["correct"] == (r["final_answer"] == row["answer"])


def test_multiple_choice_preset_rejects_a_row_without_choices(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"id": "m0", "problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    rc = run_entry_point(lambda _: run_preset(tiny_model_dir, tmp_path / "run", "multiple_choice", f"data.path={path}"), [])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err  # checked while reading the file, before the model loads
    assert err == f"error: {path}:1: data.prompt=choice needs a 'choices' field on every row"


@pytest.mark.parametrize("config, method", [("resample.yaml", "resample"), ("latentseek_anchored.yaml", "latentseek")])
def test_the_resample_control_and_anchored_latentseek_use_latentseeks_reward_stopping_and_answer_rules(config, method):
    # "same reward and stopping rule" must be true by default, or the control compares apples with pears
    seek = load_config(AdaptConfig, [str(ROOT / "configs" / "latentseek.yaml")], [])
    other = load_config(AdaptConfig, [str(ROOT / "configs" / config)], [])
    assert other.method == method and other.reward == seek.reward
    for key in ("max_iterations", "stop_threshold", "answer"):
        assert getattr(other.latent, key) == getattr(seek.latent, key), key
    assert other.generation.max_new_tokens == seek.generation.max_new_tokens
    assert other.data.batch_size == seek.data.batch_size


def test_the_own_edit_config_is_the_tuned_latentevolve_with_only_the_archive_changed():
    # latentevolve_own_edit.yaml restates latentevolve_tuned.yaml so that it reads on its own;
    # a change to one that misses the other would make the memory comparison unfair
    tuned = load_config(AdaptConfig, [str(ROOT / "configs" / "latentevolve_tuned.yaml")], ["evolve.archive=own_edit"])
    own = load_config(AdaptConfig, [str(ROOT / "configs" / "latentevolve_own_edit.yaml")], [])
    assert own.evolve.archive == "own_edit"
    assert (to_yaml(own).replace("config_name: latentevolve_own_edit", "config_name: latentevolve_tuned")
            == to_yaml(tuned))


def test_the_default_config_is_the_anchored_search(monkeypatch):
    # python adapt.py with no --config runs our best method; the paper's form is one --config away
    class Loaded(Exception):
        pass

    def capture(schema, files, overrides):
        raise Loaded(load_config(schema, files, overrides))

    monkeypatch.setattr(adapt, "load_config", capture)
    with pytest.raises(Loaded) as loaded:
        adapt.main([])
    cfg = loaded.value.args[0]
    anchored = load_config(AdaptConfig, [str(ROOT / "configs" / "latentseek_anchored.yaml")], [])
    assert cfg.method == "latentseek" and cfg.latent.edit_from == "first_failing_line" and cfg.latent.reanchor
    assert to_yaml(cfg) == to_yaml(anchored)
    paper = load_config(AdaptConfig, [str(ROOT / "configs" / "latentseek_paper.yaml")], [])
    assert paper.latent.edit_from == "start" and not paper.latent.reanchor
