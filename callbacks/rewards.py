"""The reward's Lightning hook: a reward may keep something per problem (the majority
reward's vote), which it drops once the problem's batch is written."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class ForgetFinishedProblems(Callback):
    def __init__(self, reward):
        self.reward = reward

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.reward.forget([p["id"] for p in batch])
