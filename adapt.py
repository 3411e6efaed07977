"""Test-time adaptation of a frozen LLM's latents: ``Trainer.predict`` over a problem set.

    python adapt.py                                    # configs/latentseek_anchored.yaml: our best method, embedded model
    python adapt.py --config configs/latentseek_paper.yaml   # the paper's LatentSeek
    python adapt.py --config configs/cot.yaml data.limit=100
    python adapt.py reward.kind=verifier data.path=../shared/data/gsm8k_test.jsonl \\
        model.path=/models/Qwen2.5-7B-Instruct model.dtype=bfloat16 trainer.accelerator=gpu
    python adapt.py trainer.devices=8 trainer.strategy=ddp ...   # problems sharded over ranks
    python adapt.py model.device_map=auto "model.max_memory={0: 75GiB, 1: 75GiB}" ...   # one model over two GPUs
    python adapt.py --help                             # every key, its default and meaning

Results go to ``run_dir`` (config.yaml, predictions.jsonl, summary.json, logs/); rerunning
with the same ``run_dir`` skips the problems already recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_latent.cli import help_text, load_config, parse_args
from lit_latent.config import AdaptConfig, UserError
from lit_latent.runs import GracefulStop, launched_as_rank_zero, prepare_run_dir, quiet_lightning, run_entry_point

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "latentseek_anchored.yaml"  # our best method (docs/equal-budgets.md)


def main(argv: list[str]) -> dict:
    config_files, overrides, want_help = parse_args(argv)
    if want_help:
        print(help_text(AdaptConfig, "adapt.py"))
        return {}
    cfg = load_config(AdaptConfig, config_files or [str(DEFAULT_CONFIG)], overrides)

    quiet_lightning()
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.rewards import ForgetFinishedProblems
    from callbacks.writer import PredictionWriter, merge_rank_files
    from lit_latent.data import ProblemDataModule, read_problems
    from lit_latent.generation import load_model
    from lit_latent.module import NEEDS_REWARD, LatentAdaptationModule
    from lit_latent.results import read_records
    from lit_latent.rewards import make_reward

    problems = read_problems(cfg.data.path, cfg.data.limit, require_choices=cfg.data.prompt == "choice", offset=cfg.data.offset)
    run_dir = prepare_run_dir(cfg)
    if launched_as_rank_zero():
        merge_rank_files(run_dir)  # a killed multi-device run leaves per-rank files: their problems are done
    done = {r["id"] for r in read_records(run_dir / "predictions.jsonl")}
    L.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = load_model(cfg.model, run_dir)

    writer = PredictionWriter(run_dir)
    callbacks = [TQDMProgressBar()]
    reward = make_reward(cfg.reward) if cfg.method in NEEDS_REWARD else None
    if reward is not None:
        callbacks.append(ForgetFinishedProblems(reward))
    module = LatentAdaptationModule(model, tokenizer, cfg, reward)
    if cfg.method == "latentevolve":
        callbacks += setup_latent_evolve(cfg, module, run_dir, done, uses_labels=reward.uses_labels)
    callbacks.append(writer)  # after the memory callbacks: they annotate the records before they are written
    lockstep = cfg.method == "latentevolve"  # its ranks exchange memory entries after every batch
    stop = GracefulStop(lockstep)
    callbacks.append(stop.callback())  # after the writer: a stop request ends the run once the batch is saved
    trainer = L.Trainer(
        **cfg.trainer.__dict__,
        callbacks=callbacks,
        logger=CSVLogger(run_dir, name="logs", version=""),
        inference_mode=False,  # latents need autograd; predict_step also opens enable_grad
        enable_model_summary=False,
    )
    if lockstep and trainer.world_size > 1 and launched_as_rank_zero():
        check_lockstep_launch(trainer, cfg.trainer.strategy)
    batch_size = 1 if cfg.perf.reference_mode else cfg.data.batch_size
    datamodule = ProblemDataModule(problems, batch_size, skip_ids=done, lockstep=lockstep)
    if done and launched_as_rank_zero():
        print(f"resuming {run_dir}: {len(done)} problems already recorded, {len(datamodule.problems)} to go")
    stop.install()
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer.summary


def check_lockstep_launch(trainer, strategy: str) -> None:
    """LatentEvolve's ranks need DDP started by Lightning from this one command: the ranks it
    starts re-run it with their rank in the environment, so each knows before the process group
    exists whether it writes the memory, and they share this process's locks. Spawned or forked
    ranks (ddp_spawn) would copy a memory that writes, and ranks started by another launcher
    (torchrun, srun) would each take the locks."""
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    if not (isinstance(trainer.strategy, DDPStrategy) and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)):
        raise UserError(f"config key trainer.strategy: method latentevolve on {trainer.world_size} devices runs under "
                        f"trainer.strategy=ddp started by this command (got {strategy}, {type(trainer.strategy).__name__})")


def setup_latent_evolve(cfg: AdaptConfig, module, run_dir: Path, done: set, uses_labels: bool) -> list:
    """The episodic memory (loaded if it exists, its entries of problems without a record in
    ``done`` dropped), a trained weaver if given, and the day/night callbacks (which, under DDP,
    share the memory and the nights' weavers between the ranks). A memory or weaver
    made under a gold-label reward is refused in a run whose reward uses none (its edits would
    carry the labels in)."""
    from callbacks.memory import MemoryCallback, NightCallback
    from lit_latent.generation import model_id
    from lit_latent.heads import latent_size
    from lit_latent.memory import EpisodicMemory, check_labels
    from lit_latent.runs import hold_lock
    from lit_latent.weaver import load_weaver

    hidden = latent_size(module.model)  # lm_head's input: OPT with project_out has 32 where config says 64
    ident = model_id(cfg.model.path)
    memory_dir = Path(cfg.memory.path or run_dir / "memory")
    if memory_dir.is_dir() or not memory_dir.exists():  # one writer of a memory, whichever run names it
        memory_dir.mkdir(parents=True, exist_ok=True)
        hold_lock(memory_dir, "memory.path")
    # under DDP rank 0 writes the memory; the other ranks hold the same entries in RAM
    module.memory = EpisodicMemory(memory_dir, ident, hidden, cfg.memory.backend, reward=cfg.reward.kind,
                                   uses_labels=uses_labels, recorded=done, writes=launched_as_rank_zero())
    check_labels(module.memory.uses_labels, uses_labels, "memory.path", f"memory at {module.memory.path}")
    if cfg.weaver.checkpoint:
        module.weaver = load_weaver(cfg.weaver.checkpoint, hidden, ident, latent_count=cfg.evolve.latent_count,
                                    backbone_path=cfg.weaver.backbone_path)
        check_labels(module.weaver.uses_labels, uses_labels, "weaver.checkpoint", f"weaver checkpoint {cfg.weaver.checkpoint}")
    callbacks = [MemoryCallback(module.memory, cfg.evolve.archive_threshold)]
    if cfg.evolve.night_every:
        callbacks.append(NightCallback(cfg.evolve.night_every, module.memory, cfg.weaver, run_dir / "weaver", cfg.seed,
                                       ident, hidden, cfg.weaver.backbone_path or cfg.model.path, len(done)))
    return callbacks


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
