from pathlib import Path

import pytest

from lit_latent.cli import help_text, load_config, parse_args
from lit_latent.config import AdaptConfig, TrainConfig, UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    # train_*.yaml configure train.py, the rest adapt.py
    cfg = load_config(TrainConfig if path.stem.startswith("train") else AdaptConfig, [str(path)], [])
    assert cfg.config_name == path.stem


def test_overrides_reach_typed_fields():
    cfg = load_config(AdaptConfig, [], ["data.limit=5", "latent.lr=0.1", "trainer.devices=2", "reward.weights.calculation=3"])
    assert cfg.data.limit == 5 and cfg.latent.lr == 0.1 and cfg.trainer.devices == 2
    assert cfg.reward.weights == {"calculation": 3}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.limt=3"], "unknown config key data.limt (did you mean data.limit?)"),
        (["latent.lrr=1"], "did you mean latent.lr?"),
        (["nonsense=1"], "unknown config key nonsense"),
        (["data.limit=abc"], "config key data.limit"),
        (["data.limit=0"], "config key data.limit: must be > 0"),
        (["data.batch_size=-2"], "config key data.batch_size: must be > 0"),
        (["model.dtype=float64"], "config key model.dtype: 'float64' is not one of"),
        (["method=magic"], "config key method"),
        (["reward.kind=custom"], "config key reward.class_path: required"),
        (["latent.rho=1.5"], "config key latent.rho"),
        (["evolve.rho=0"], "config key evolve.rho: must be in (0, 1] or null, got 0"),
        (["evolve.answer=greedy"], "config key evolve.answer: 'greedy' is not one of last, best, sample"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(AdaptConfig, [], overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(AdaptConfig, [str(tmp_path / "none.yaml")], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  limit: [1\n")
    with pytest.raises(UserError, match="bad.yaml: cannot parse YAML"):
        load_config(AdaptConfig, [str(bad)], [])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("latent:\n  rhoo: 0.5\n")
    with pytest.raises(UserError, match=r"unknown.yaml: unknown config key latent.rhoo \(did you mean latent.rho\?\)"):
        load_config(AdaptConfig, [str(unknown)], [])


def test_parse_args_and_help():
    assert parse_args(["--config", "a.yaml", "--config=b.yaml", "x=1", "y=2"]) == (["a.yaml", "b.yaml"], ["x=1", "y=2"], False)
    assert parse_args(["--help"])[2] is True
    with pytest.raises(UserError, match="unexpected argument"):
        parse_args(["--verbose"])
    text = help_text(AdaptConfig, "adapt.py")
    for key in ("model.path=", "model.dtype=float32", "data.path=", "data.limit=None", "run_dir=None", "seed=0",
                "trainer.accelerator=auto", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=None"):
        assert key in text
    # every key line carries a description
    key_lines = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert all(len(ln.split("  ")) >= 3 and ln.split("  ")[-1].strip() for ln in key_lines)
