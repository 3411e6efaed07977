"""Fit LatentEvolve's latent weaver on an episodic memory (the "night", offline): ``Trainer.fit``.

    python train.py run_dir=runs/<an adapt run>          # its memory: <run_dir>/memory -> <run_dir>/weaver
    python train.py memory.path=runs/x/memory out=weavers/x weaver.layers=4
    python train.py weaver.kind=lora weaver.backbone_path=/models/Qwen2.5-1.5B-Instruct run_dir=... \\
        trainer.accelerator=gpu trainer.precision=bf16-mixed
    python train.py trainer.devices=4 trainer.strategy=ddp run_dir=...
    python train.py --help                               # every key, its default and meaning

The checkpoint (weaver.safetensors + weaver.json) is what ``weaver.checkpoint=...`` of adapt.py
loads. Rerunning a killed fit with the same settings resumes from ``<out>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lit_latent.cli import help_text, load_config, parse_args
from lit_latent.config import TrainConfig, UserError
from lit_latent.runs import hold_lock, quiet_lightning, run_entry_point

if TYPE_CHECKING:
    from lit_latent.weaver import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "train_weaver.yaml"


def main(argv: list[str]) -> Optional["FitResult"]:
    config_files, overrides, want_help = parse_args(argv)
    if want_help:
        print(help_text(TrainConfig, "train.py"))
        return None
    cfg = load_config(TrainConfig, config_files or [str(DEFAULT_CONFIG)], overrides)
    if cfg.memory.path is None and cfg.run_dir is None:
        raise UserError("no memory given: set memory.path=<memory dir> or run_dir=<an adapt run with a memory>")
    memory_dir = Path(cfg.memory.path) if cfg.memory.path else Path(cfg.run_dir) / "memory"
    out = Path(cfg.out) if cfg.out else (Path(cfg.run_dir) if cfg.run_dir else memory_dir.parent) / "weaver"

    quiet_lightning()
    from lightning.pytorch.utilities import rank_zero_only

    from lit_latent.memory import EpisodicMemory
    from lit_latent.weaver import fit_weaver

    say = print if rank_zero_only.rank == 0 else (lambda *a: None)  # DDP: one report, from rank 0
    memory = EpisodicMemory.open(memory_dir)  # UserError when there is no memory
    out.mkdir(parents=True, exist_ok=True)
    hold_lock(out, "out")  # one fit writes a weaver folder at a time (its DDP ranks share the lock)
    e, z_base, z_star = memory.tensors()
    say(f"memory {memory_dir}: {len(memory)} entries of {memory.latent_count} latents (model {memory.model_id})")
    result = fit_weaver(
        e, z_base, z_star, cfg.weaver, cfg.trainer, out, cfg.seed, memory.hidden_size, memory.model_id,
        backbone_path=cfg.weaver.backbone_path, uses_labels=memory.uses_labels,
    )
    say(f"weaver saved to {result.path} after {result.epochs} epochs")
    say(f"train_mse {result.train_mse_first:.6g} -> {result.train_mse_last:.6g}")
    say(f"val_mse {result.val_mse:.6g} (identity baseline {result.identity_val_mse:.6g})")
    if result.identity:
        say("no epoch beat the identity on validation: the identity weaver was saved")
    return result


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
