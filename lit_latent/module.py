"""The adaptation LightningModule: test-time methods run inside ``predict_step``.

``Trainer(inference_mode=False).predict(module, datamodule)`` hands each batch of problems
to ``predict_step``, which runs the configured method (``lit_latent/methods``) to the end and
returns one plain record per problem; the writer callback appends them to
``predictions.jsonl``. The model is frozen: methods optimize latents with optimizers they make
themselves, never the model's weights.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch

from lit_latent.config import AdaptConfig
from lit_latent.devices import device_mapped, output_device
from lit_latent.engine import Engine
from lit_latent.methods import sampling
from lit_latent.methods.latentevolve import latent_evolve
from lit_latent.methods.latentseek import latent_seek
from lit_latent.methods.ltpo import ltpo
from lit_latent.packed_linear import pack_linear_weights
from lit_latent.rewards import Reward

NEEDS_REWARD = ("latentseek", "resample", "best_of_n", "latentevolve")


class LatentAdaptationModule(L.LightningModule):
    def __init__(self, model, tokenizer, cfg: AdaptConfig, reward: Optional[Reward] = None):
        super().__init__()
        if cfg.method in NEEDS_REWARD and reward is None:
            raise ValueError(f"method {cfg.method} needs a reward (lit_latent.rewards.make_reward)")
        if device_mapped(model):
            # not a submodule: accelerate placed its layers (some maybe offloaded, on meta), and the
            # Trainer's move of the module to one device would undo that or fail on the offloaded ones
            object.__setattr__(self, "model", model)
        else:
            self.model = model  # a submodule, so the Trainer moves it to the device
        self.model.requires_grad_(False)
        self.engine = Engine(model, tokenizer, cfg)
        self.cfg = cfg
        self.reward = reward
        self.automatic_optimization = False
        # LatentEvolve: the episodic memory (set by the entry point) and the latent weaver
        # (loaded from a checkpoint, or handed over by the night callback)
        self.memory = None
        self.weaver: Optional[torch.nn.Module] = None
        self._logged_batches = 0  # x axis of the reward curves in logs/metrics.csv

    def setup(self, stage: str) -> None:
        if self.cfg.perf.compile and not getattr(self, "_compiled", False):
            # dynamic shapes: batch and cache lengths change at every step
            self.model.base_model.forward = torch.compile(self.model.base_model.forward, dynamic=True)
            self._compiled = True

    def on_predict_start(self) -> None:
        # after the Trainer placed the model: its large linear layers packed for oneDNN on CPU
        perf = self.cfg.perf
        if perf.pack_weights and not perf.compile and self.engine.device.type == "cpu" and not device_mapped(self.model):
            pack_linear_weights(self.model)

    def configure_optimizers(self):
        return None  # latent optimizers are made per batch, inside the methods

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[dict[str, Any]]:
        start = time.perf_counter()
        self.engine.new_batch()
        # Lightning wraps predict in no_grad even with inference_mode=False
        autocast = torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=self.cfg.perf.autocast)
        with torch.enable_grad(), autocast:
            records = self.run_method(batch)
        self.log_rewards(records)
        seconds = (time.perf_counter() - start) / max(1, len(batch))
        for rec in records:
            rec["seconds"] = seconds
        return records

    def run_method(self, problems: list[dict]) -> list[dict]:
        cfg, engine, reward = self.cfg, self.engine, self.reward
        if cfg.method == "cot":
            return sampling.chain_of_thought(engine, problems)
        if cfg.method == "self_consistency":
            return sampling.self_consistency(engine, problems, cfg.generation.num_samples)
        if cfg.method == "best_of_n":
            return sampling.best_of_n(engine, problems, reward, cfg.generation.num_samples)
        if cfg.method == "resample":
            return sampling.resample(engine, problems, reward, cfg.latent)
        if cfg.method == "latentseek":
            return latent_seek(engine, problems, reward, cfg.latent)
        if cfg.method == "latentevolve":
            # the weaver maps latents, which live on lm_head's device (another than the module's under a device map)
            weaver = self.weaver.to(output_device(self.model)) if self.weaver is not None else None
            return latent_evolve(engine, problems, reward, cfg.evolve, self.memory, weaver)
        if cfg.method == "ltpo":
            return ltpo(engine, problems, cfg.ltpo, cfg.reward.top_k)
        raise ValueError(f"method {cfg.method!r} is not run by {type(self).__name__}")

    def log_rewards(self, records: list[dict]) -> None:
        """Mean reward by iteration for this batch, to the logger (CSV in the run folder)."""
        records = [r for r in records if r.get("rewards")]
        if self.logger is None or not records:
            return
        depth = max(len(r["rewards"]) for r in records)
        metrics = {}
        for k in range(depth):
            # a problem that stopped early keeps its last reward for later iterations
            values = [r["rewards"][min(k, len(r["rewards"]) - 1)] for r in records]
            metrics[f"reward_iter{k}"] = sum(values) / len(values)
        self.logger.log_metrics(metrics, step=self._logged_batches)
        self._logged_batches += 1
