"""Writes each problem's record the moment its batch finishes, and the summary at the end.

One file per rank under DDP (``predictions.rank<r>.jsonl``), merged by rank 0 into
``predictions.jsonl`` when prediction ends; a single process appends to
``predictions.jsonl`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from lit_latent.answers import AnswerAccuracy
from lit_latent.results import PREDICTIONS, append_records, format_table, read_records, repair, write_summary


class PredictionWriter(BasePredictionWriter):
    def __init__(self, run_dir: str | Path):
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self.final_path = self.run_dir / PREDICTIONS
        self.path = self.final_path
        # this rank's running accuracy for the progress bar (never synced: ranks end at different batches)
        self.accuracy = AnswerAccuracy(sync_on_compute=False)
        self.done = 0
        self.summary: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1:
            self.path = self.run_dir / f"predictions.rank{trainer.global_rank}.jsonl"
        repair(self.path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        append_records(self.path, prediction)
        self.done += len(prediction)
        self.accuracy.update([bool(r["correct"]) for r in prediction])
        bar = trainer.progress_bar_callback
        if bar is not None and getattr(bar, "predict_progress_bar", None) is not None:
            bar.predict_progress_bar.set_postfix(problems=self.done, accuracy=f"{float(self.accuracy.compute()):.3f}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a stopped or failed run still leaves a summary of what it finished
        if trainer.global_rank == 0 and self.final_path.is_file():
            try:
                self.summary = write_summary(self.run_dir, read_records(self.final_path))
            except OSError:
                pass  # the disk that failed the run fails this too: the run's own error is the one to report

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            trainer.strategy.barrier("predictions-written")
            if trainer.global_rank == 0:
                merge_rank_files(self.run_dir)
            trainer.strategy.barrier("predictions-merged")
        if trainer.global_rank == 0:
            self.summary = write_summary(self.run_dir, read_records(self.final_path))
            print(f"\n{format_table(self.summary)}\nresults: {self.run_dir}")


def merge_rank_files(run_dir: Path) -> None:
    """Append every rank file's records not yet in ``predictions.jsonl``, then remove them."""
    final = run_dir / PREDICTIONS
    repair(final)
    seen = {r["id"] for r in read_records(final)}
    for rank_file in sorted(run_dir.glob("predictions.rank*.jsonl")):
        new = [r for r in read_records(rank_file) if r["id"] not in seen]
        append_records(final, new)
        seen.update(r["id"] for r in new)
        rank_file.unlink()
