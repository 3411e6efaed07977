"""The fast path against the reference cost profile, and the active set of a batch."""

import lightning as L
import torch

from custom_rewards import PassAfterReward
from lit_latent.data import ProblemDataModule
from lit_latent.module import LatentAdaptationModule
from test_module import PROBLEMS, make_cfg


def predict(model, tokenizer, cfg, reward, batch_size):
    module = LatentAdaptationModule(model, tokenizer, cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[reward], inference_mode=False,
                        enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(module, datamodule=ProblemDataModule(PROBLEMS, batch_size))
    return [{k: v for k, v in r.items() if k != "seconds"} for b in out for r in b]


def test_fast_path_and_reference_mode_give_identical_records(tiny_model, char_tokenizer):
    for samples in (1, 3):
        cfg = make_cfg(max_latents=4, lr=0.05, samples=samples)
        fast = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=3)
        cfg.perf.reference_mode = True
        slow = predict(tiny_model, char_tokenizer, cfg, PassAfterReward(3), batch_size=1)
        assert fast == slow


class StopFirst(PassAfterReward):
    """Problem p0 passes at its first candidate; the others never pass."""

    def score(self, module, problems, completions):
        scores = super().score(module, problems, completions)
        scores.rewards = [1.0 if p["id"] == "p0" and self.seen[p["id"]] == 2 else 0.0 for p in problems]
        return scores


def test_a_finished_problem_leaves_the_active_set(tiny_model, char_tokenizer, monkeypatch):
    snapshots = []
    real_adam = torch.optim.Adam

    class SpyAdam(real_adam):
        def step(self, closure=None):
            result = super().step(closure)
            snapshots.append([p.detach().clone() for p in self.param_groups[0]["params"]])
            return result

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    recs = predict(tiny_model, char_tokenizer, make_cfg(max_latents=3, max_iterations=4), StopFirst(0), batch_size=3)
    assert [r["iterations"] for r in recs] == [1, 4, 4]
    assert len(snapshots) == 4
    # p0's latents (param 0) never move after its first step; the others keep moving
    assert all(torch.equal(s[0], snapshots[0][0]) for s in snapshots[1:])
    assert not torch.equal(snapshots[1][1], snapshots[3][1])
