"""A model spread by a device map (``model.device_map``) answers exactly as the same model loaded whole.

On CPU the layers a map puts on disk are offloaded: their weights sit on ``meta`` until
accelerate's hooks read them in for their own forward, and the first parameter (the input
embeddings) may be one of them. Every method's records must equal a normal load's, field by field
but the seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapt
from conftest import write_sum_problems
from lit_latent.config import AdaptConfig, ModelConfig
from lit_latent.runs import run_entry_point

ROOT = Path(__file__).resolve().parents[1]
# the embeddings, a layer and lm_head on disk: ids go where no weight sits, latents come from an offloaded head
SPLIT = '{model.embed_tokens: disk, model.layers.0: cpu, model.layers.1: disk, model.norm: cpu, model.rotary_emb: cpu, lm_head: disk}'


@pytest.fixture()
def problems_file(tmp_path):
    return write_sum_problems(tmp_path / "problems.jsonl", 4)


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return sorted(rows, key=lambda r: r["id"])


def run(tmp_path, name: str, args: list[str]) -> list[dict]:
    adapt.main([*args, f"run_dir={tmp_path / name}", "trainer.accelerator=cpu"])
    return records(tmp_path / name)


METHODS = {
    "cot": ["--config", "configs/cot.yaml"],
    "latentseek": ["--config", "configs/latentseek_anchored.yaml", "latent.max_iterations=2"],
    "latentevolve": ["--config", "configs/latentevolve_tuned.yaml", "evolve.max_steps=2", "evolve.samples=2", "evolve.latent_count=4", "evolve.archive_threshold=0",
                     "evolve.night_every=2", "weaver.max_epochs=2"],
    "ltpo": ["--config", "configs/ltpo.yaml", "ltpo.steps=2"],
    "ltpo_reinforce": ["--config", "configs/ltpo.yaml", "ltpo.steps=2", "ltpo.gradient=reinforce"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_records_equal_a_normal_load(method, tiny_model_dir, problems_file, tmp_path):
    args = [*(str(ROOT / a) if a.endswith(".yaml") else a for a in METHODS[method]), f"model.path={tiny_model_dir}",
            f"data.path={problems_file}", "generation.max_new_tokens=8", "data.batch_size=2"]
    whole = run(tmp_path, "whole", args)
    spread = run(tmp_path, "spread", [*args, f"model.device_map={SPLIT}"])
    assert len(whole) == 4 and spread == whole
    assert (tmp_path / "spread" / "offload").is_dir()  # the default offload folder: in the run folder


def test_the_issues_command_offloads_the_embedded_model_to_disk(tmp_path):
    """``python adapt.py --config configs/cot.yaml model.device_map=auto "model.max_memory={cpu: 2MB}"``:
    2 MB of CPU holds no layer of the 12 MB embedded model, so all go to disk."""
    args = ["--config", str(ROOT / "configs" / "cot.yaml"), "data.limit=3"]
    whole = run(tmp_path, "whole", args)
    spread = run(tmp_path, "spread", [*args, "model.device_map=auto", "model.max_memory={cpu: 2MB}"])
    assert spread == whole
    assert (tmp_path / "spread" / "offload").is_dir()


def test_an_offloaded_model_is_placed_by_its_map_and_left_there(tiny_model_dir, tmp_path):
    from lit_latent.devices import device_mapped, input_device, output_device
    from lit_latent.generation import load_model
    from lit_latent.module import LatentAdaptationModule

    model, tokenizer = load_model(ModelConfig(path=str(tiny_model_dir), device_map=json_map(SPLIT)), tmp_path)
    assert device_mapped(model) and model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == output_device(model) == torch.device("cpu")
    module = LatentAdaptationModule(model, tokenizer, AdaptConfig(method="cot"))
    assert "model" not in dict(module.named_children())
    module.to("cpu")  # what the Trainer does to the module: a submodule's meta weights could not move
    assert model.get_input_embeddings().weight.device.type == "meta" and module.model is model


def json_map(text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(f"m: {text}"))["m"]


def test_nan_in_an_offloaded_weight_is_named(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    rc = run_entry_point(adapt.main, ["--config", str(ROOT / "configs" / "cot.yaml"), f"model.path={broken}",
                                      f"model.device_map={SPLIT}", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "NaN or inf in its weights (model.layers.1.mlp.up_proj.weight)" in err and "\n" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.device_map=auto", "trainer.devices=2"], "config key model.device_map: spreads one model over the devices of one process"),
        (["model.device_map=auto", "trainer.strategy=ddp"], "cannot be combined with trainer.strategy=ddp"),
        (["model.device_map=auto", "perf.compile=true"], "config key perf.compile: not supported with model.device_map"),
        (["model.max_memory={cpu: 2MB}"], "config key model.max_memory: sizes devices for model.device_map=auto"),
        (["model.device_map=auto", "model.max_memory={cpu: 2TB}"], "config key model.max_memory: cpu: '2TB' is not a size"),
        (["model.device_map=auto", "model.max_memory={cpu:2MB}"], "write a space after the colon"),
        (["model.device_map=gpu"], "config key model.device_map: 'gpu' is not a device"),
        (["model.device_map={lm_head: 0.5}"], "config key model.device_map: 0.5 for lm_head is not a device"),
        (["model.device_map=cuda:3"] if not torch.cuda.is_available() else ["model.device_map=cuda:999"],
         "config key model.device_map: cannot load"),
        (["model.offload_folder=/tmp/x"], "config key model.offload_folder: holds the layers a device map puts on disk"),
        (["model.device_map={model.nope: cpu}"], "config key model.device_map: llama has no module 'model.nope'"),
        (["model.device_map={model.layers.0: disk, model.layers.1: cpu}"], "config key model.device_map: places no module holding model.embed_tokens.weight"),
    ],
)
def test_what_cannot_work_is_refused_in_one_line(extra, message, tiny_model_dir, tmp_path, capsys):
    rc = run_entry_point(adapt.main, ["--config", str(ROOT / "configs" / "cot.yaml"), f"model.path={tiny_model_dir}",
                                      f"run_dir={tmp_path / 'r'}", "data.limit=1", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
