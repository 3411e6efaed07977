"""Problems from JSONL files, validated at the edge, served by a LightningDataModule.

A row is ``{"id", "problem", "answer"}`` plus optional ``solution`` and ``choices``; the
files in ``shared/data`` load as they are. Every bad row is an error naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lit_latent.config import UserError
from lit_latent.prompts import choice_prompt, math_prompt


def read_problems(path: str | Path, limit: Optional[int] = None, require_choices: bool = False, offset: int = 0) -> list[dict[str, Any]]:
    """Read and validate a problems file; ``offset`` skips the first N problems, ``limit`` keeps
    the next N. ``require_choices``: every row must have ``choices`` (data.prompt=choice)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config key data.path: file not found: {path}")
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(problems) >= offset + limit:
                break
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("problem", "answer"):
                if key not in row or row[key] is None:
                    raise UserError(f"{where}: missing field {key!r}")
            if not isinstance(row["problem"], str) or not row["problem"].strip():
                raise UserError(f"{where}: field 'problem' is empty")
            if "id" in row and not isinstance(row["id"], str):  # null would become the id 'None', 1 and "1" collide
                raise UserError(f"{where}: field 'id' must be a string, got {json.dumps(row['id'])}")
            pid = row.get("id", f"{path.stem}-{lineno - 1}")
            if pid in seen:
                raise UserError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            choices = row.get("choices")
            if choices is not None and (not isinstance(choices, list) or not choices):
                raise UserError(f"{where}: field 'choices' must be a non-empty list")
            if require_choices and choices is None:
                raise UserError(f"{where}: data.prompt=choice needs a 'choices' field on every row")
            problems.append(
                {
                    "id": pid,
                    "problem": row["problem"],
                    "answer": str(row["answer"]).strip(),
                    "choices": [str(c) for c in choices] if choices else None,
                }
            )
    if not problems:
        raise UserError(f"config key data.path: {path} holds no problems")
    if offset >= len(problems):
        raise UserError(f"config key data.offset: {offset} skips every problem ({path} holds {len(problems)})")
    return problems[offset:]


def user_message(problem: dict[str, Any], prompt: str = "auto") -> str:
    """The question as the model is asked it: step by step, answer (or letter) in \\boxed{}."""
    if prompt == "choice" or (prompt == "auto" and problem.get("choices")):
        if not problem.get("choices"):
            raise UserError(f"problem {problem['id']}: data.prompt=choice needs a 'choices' field")
        return choice_prompt(problem["problem"], problem["choices"])
    return math_prompt(problem["problem"])


def num_choices(problem: dict[str, Any]) -> int:
    return len(problem["choices"]) if problem.get("choices") else 0


class ProblemDataModule(L.LightningDataModule):
    """Serves problems in file order; ids already done (resume) are left out.

    ``lockstep``: under DDP every rank gets the same number of batches, so that the ranks can
    exchange something after each one (LatentEvolve's memory). torch's ``DistributedSampler``
    does it by repeating the first problems at the end; the callbacks drop those repeats.
    Without it Lightning's predict sampler gives the ranks uneven shards and no repeats.
    """

    def __init__(self, problems: list[dict[str, Any]], batch_size: int, skip_ids: Iterable[str] = (), lockstep: bool = False):
        super().__init__()
        skip = set(skip_ids)
        self.problems = [p for p in problems if p["id"] not in skip]
        self.batch_size = batch_size
        self.lockstep = lockstep

    def predict_dataloader(self) -> DataLoader:
        sampler = None
        if self.lockstep and self.trainer is not None and self.trainer.world_size > 1:
            # Lightning keeps a DistributedSampler it is given instead of sharding unevenly itself
            sampler = DistributedSampler(self.problems, shuffle=False, drop_last=False, **self.trainer.distributed_sampler_kwargs)
        # collate to a plain list of dicts: prompts are tokenized by the module, which owns the tokenizer
        return DataLoader(self.problems, batch_size=self.batch_size, shuffle=False, sampler=sampler, collate_fn=list)
