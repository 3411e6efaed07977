"""LatentEvolve's memory updates and nights, as Lightning callbacks.

``MemoryCallback`` archives each finished problem's ``(e, z_base, z*)`` when its final mean
reward reaches tau (``on_predict_batch_end``, before the writer sees the batch).
``NightCallback`` trains the latent weaver on the memory every T problems, with the same
``fit_weaver`` that ``python train.py`` runs, and hands it to the adaptation module.

Both act before the writer, and the record is what makes a problem done: the memory archives a
batch as pending and commits it once the batch's records are written (at the next batch's
start), and a night is logged in ``nights.json`` with the problem count it came after. A run
killed in between redoes the batch: its pending entries are dropped (``EpisodicMemory``) and
a night after more problems than were recorded is discarded and trained again, so the resumed
run is the run it would have been.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lit_latent.config import TrainerConfig, WeaverConfig


class MemoryCallback(Callback):
    def __init__(self, memory, threshold: float):
        self.memory = memory
        self.threshold = threshold

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.memory.commit()  # the previous batch's records are written

    def on_predict_end(self, trainer, pl_module):
        self.memory.commit()

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[dict[str, Any]], batch, batch_idx, dataloader_idx=0):
        keep = [r for r in outputs if "_archive" in r and r["_archive"]["score"] >= self.threshold]
        for r in outputs:
            r["archived"] = any(r is k for k in keep)
        if keep:
            self.memory.add(
                torch.stack([r["_archive"]["e"] for r in keep]),
                torch.stack([r["_archive"]["z_base"] for r in keep]),
                torch.stack([r["_archive"]["z_star"] for r in keep]),
                [float(r["_archive"]["score"]) for r in keep],
                [r["id"] for r in keep],
                [r["_archive"].get("answer") for r in keep],  # evolve.archive=answer: the answer found, its iterations
                [r["_archive"].get("iterations", 0) for r in keep],
                [r["_archive"].get("keys") for r in keep],  # how a problem met again is recognised (evolve.recall)
                pending=True,  # until the writer has the batch's records on disk
            )


class NightCallback(Callback):
    """Every ``every`` problems (counted over the whole run, resumed ones included), fit a
    fresh weaver on the memory so far and use it from the next problem on. A resumed run
    reloads the newest night's weaver (of those logged after at most ``problems_done``
    problems) and goes on counting nights from it."""

    LOG = "nights.json"

    def __init__(self, every: int, memory, weaver_cfg: WeaverConfig, out_dir: str | Path, seed: int,
                 model_id: str, hidden_size: int, backbone_path: str | None = None, problems_done: int = 0):
        self.every = every
        self.memory = memory
        self.weaver_cfg = weaver_cfg
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.model_id = model_id
        self.hidden_size = hidden_size
        self.backbone_path = backbone_path
        self.seen = problems_done
        log = self.out_dir / self.LOG
        logged = json.loads(log.read_text(encoding="utf-8")) if problems_done and log.is_file() else []
        self.nights: list[dict[str, Any]] = [n for n in logged if n["after_problems"] <= problems_done]

    def on_predict_start(self, trainer, pl_module):
        if self.nights:
            from lit_latent.weaver import load_weaver

            last = self.nights[-1]["checkpoint"]
            pl_module.weaver = load_weaver(last, self.hidden_size, self.model_id, backbone_path=self.backbone_path).to(pl_module.device)
            print(f"resuming after night {len(self.nights)}: weaver {last}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        before = self.seen
        self.seen += len(outputs)
        if self.every and self.seen // self.every > before // self.every:
            self.night(trainer, pl_module)

    def night(self, trainer, pl_module) -> None:
        from lit_latent.weaver import fit_weaver, load_weaver

        e, z_base, z_star = self.memory.tensors()
        if len(e) < 2:
            print(f"night after {self.seen} problems skipped: the memory holds {len(e)} entries")
            return
        night = len(self.nights) + 1
        out = self.out_dir / f"night-{night:03d}"
        if out.exists():  # a killed attempt at this night (its batch had no records): fit it afresh
            shutil.rmtree(out)
        # the night's fit runs in this process on this device (LatentEvolve runs on one device)
        result = fit_weaver(e, z_base, z_star, self.weaver_cfg, TrainerConfig(accelerator="cpu" if pl_module.device.type == "cpu" else "auto", devices=1),
                            out, self.seed + night, self.hidden_size, self.model_id, self.backbone_path, progress_bar=False,
                            uses_labels=self.memory.uses_labels)
        pl_module.weaver = load_weaver(out, self.hidden_size, self.model_id, backbone_path=self.backbone_path).to(pl_module.device)
        # an entry whose z* is its z_base holds no edit: a memory of only those transfers nothing
        edited = int((z_star != z_base).flatten(1).any(1).sum())
        self.nights.append({"after_problems": self.seen, "entries": len(e), "edited": edited, "val_mse": result.val_mse,
                            "identity_val_mse": result.identity_val_mse, "checkpoint": str(out)})
        from lit_latent.results import write_atomic

        text = json.dumps(self.nights, indent=1)
        write_atomic(self.out_dir / self.LOG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"night {night} after {self.seen} problems: weaver on {len(e)} memories ({edited} with z* != z_base), "
              f"val MSE {result.val_mse:.4f} (identity {result.identity_val_mse:.4f}) -> {out}")
