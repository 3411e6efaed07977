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

Under DDP (``trainer.strategy=ddp``) the ranks run their shards in lockstep, batch by batch
(``ProblemDataModule(lockstep=True)``). After each batch ``MemoryCallback`` all-gathers what
every rank archived and every rank adds the union, in rank order, so all retrieve from the
same memory; rank 0 alone writes it, and commits a batch once every rank has passed a barrier
after writing its records. The sampler's repeats (it pads the last batches with the first
problems) are dropped from the outputs before anything counts or writes them. A night is
fitted on rank 0 while the others wait, and every rank loads the weaver rank 0 saved.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lit_latent.config import TrainerConfig, WeaverConfig
from lit_latent.runs import between_ranks, outside_the_launch


class MemoryCallback(Callback):
    def __init__(self, memory, threshold: float):
        self.memory = memory
        self.threshold = threshold
        self.finished: set[str] = set()  # DDP: ids any rank finished in this run, to recognise the sampler's repeats

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.commit(trainer)  # the previous batch's records are written

    def on_predict_end(self, trainer, pl_module):
        self.commit(trainer)

    def commit(self, trainer) -> None:
        if trainer.world_size > 1:
            with between_ranks("waiting for every rank's records"):
                trainer.strategy.barrier("records-written")  # every rank's writer has appended the batch
        self.memory.commit()

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[dict[str, Any]], batch, batch_idx, dataloader_idx=0):
        for r in outputs:
            r["archived"] = "_archive" in r and r["_archive"]["score"] >= self.threshold
        finished = outputs
        if trainer.world_size > 1:
            finished = self.exchange(trainer, outputs)
        keep = [r for r in finished if r["archived"]]
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

    def exchange(self, trainer, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's finished problems of this batch, rank by rank, each id once: its id, and
        what it archives. This rank's repeats (an id finished before, or by a lower rank in this
        batch) are removed from ``outputs`` in place, so that no later callback sees them."""
        mine = [{"id": r["id"], "archived": r["archived"], "_archive": r["_archive"] if r["archived"] else None} for r in outputs]
        finished, first_here = [], []
        for rank, rows in enumerate(gather_objects(trainer, mine, "memory entries")):  # CPU tensors: they unpickle on any rank
            for j, row in enumerate(rows):
                if row["id"] in self.finished:
                    continue
                self.finished.add(row["id"])
                finished.append(row)
                if rank == trainer.global_rank:
                    first_here.append(j)
        outputs[:] = [outputs[j] for j in first_here]
        return finished


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
            if trainer.is_global_zero:
                print(f"resuming after night {len(self.nights)}: weaver {last}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        before = self.seen
        # after MemoryCallback, which leaves each rank only the problems it finished first
        with between_ranks("problem counts"):
            self.seen += int(trainer.strategy.reduce(torch.tensor(len(outputs), device=pl_module.device), reduce_op="sum"))
        if self.every and self.seen // self.every > before // self.every:
            self.night(trainer, pl_module)

    def night(self, trainer, pl_module) -> None:
        from lit_latent.results import write_atomic
        from lit_latent.weaver import load_weaver, weights_sha256

        e, z_base, z_star = self.memory.tensors()  # every rank holds the same memory
        if len(e) < 2:
            if trainer.is_global_zero:
                print(f"night after {self.seen} problems skipped: the memory holds {len(e)} entries")
            return
        night = len(self.nights) + 1
        out = self.out_dir / f"night-{night:03d}"
        entry = None
        if trainer.is_global_zero:
            entry = self.fit(night, out, e, z_base, z_star, pl_module.device)
        if trainer.world_size > 1:
            with between_ranks(f"night {night}'s weaver"):
                entry = trainer.strategy.broadcast(entry)  # the other ranks wait here while rank 0 fits
        pl_module.weaver = load_weaver(out, self.hidden_size, self.model_id, backbone_path=self.backbone_path).to(pl_module.device)
        # what each rank loaded, reported by the ranks themselves: nights.json shows that they agree
        digest = weights_sha256(pl_module.weaver)
        entry["weaver_sha256_by_rank"] = gather_objects(trainer, digest, "weaver checksums")
        self.nights.append(entry)
        if trainer.is_global_zero:
            text = json.dumps(self.nights, indent=1)
            write_atomic(self.out_dir / self.LOG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            print(f"night {night} after {self.seen} problems: weaver on {entry['entries']} memories ({entry['edited']} with "
                  f"z* != z_base), val MSE {entry['val_mse']:.4f} (identity {entry['identity_val_mse']:.4f}) -> {out}")

    def fit(self, night: int, out: Path, e, z_base, z_star, device: torch.device) -> dict[str, Any]:
        """Fit this night's weaver into ``out`` on this process's device; its entry in nights.json."""
        from lit_latent.weaver import fit_weaver

        if out.exists():  # a killed attempt at this night (its batch had no records): fit it afresh
            shutil.rmtree(out)
        if device.type == "cuda":
            on = TrainerConfig(accelerator="gpu", devices=[device.index or 0])  # this rank's GPU, not the first one
        else:
            on = TrainerConfig(accelerator="cpu" if device.type == "cpu" else "auto", devices=1)
        with outside_the_launch(), warnings.catch_warnings():  # a one-device fit, though this process may be a DDP rank
            # the one-process Trainer turns the weaver's sync_dist off, then sees the launch's process group and warns
            warnings.filterwarnings("ignore", message="It is recommended to use `self.log")
            result = fit_weaver(e, z_base, z_star, self.weaver_cfg, on, out, self.seed + night, self.hidden_size, self.model_id,
                                self.backbone_path, progress_bar=False, uses_labels=self.memory.uses_labels)
        # an entry whose z* is its z_base holds no edit: a memory of only those transfers nothing
        edited = int((z_star != z_base).flatten(1).any(1).sum())
        return {"after_problems": self.seen, "entries": len(e), "edited": edited, "val_mse": result.val_mse,
                "identity_val_mse": result.identity_val_mse, "checkpoint": str(out)}


def gather_objects(trainer, obj: Any, what: str) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if trainer.world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * trainer.world_size
    with between_ranks(what):
        dist.all_gather_object(gathered, obj)
    return gathered
