"""LatentEvolve's episodic memory: entries ``(e, z_base, z*, score, problem id)`` on disk and in RAM,
and, where the day search archived what it found (``evolve.archive=answer``), the latents of the
answer it found, the iterations its search spent and the problem's two recall keys (its exact
prompt, the numbers it states: ``problem_keys``).

On disk a memory is a folder of safetensors shards (float32 ``e [n, D]``, ``z_base`` and
``z_star [n, L', d]``; with answers also ``answer [sum of lengths, d]``, ``answer_length [n]``
and ``iterations [n]``; with keys ``prompt_key [n]`` and ``numbers_key [n]``, int64) plus ``manifest.json`` (model id, latent size ``d`` under the key
``hidden_size``, latent count, the rewards its entries were scored by and whether any of them
uses gold labels, and per shard its problem ids and scores). ``d`` is ``lm_head``'s input size
(``heads.latent_size``), which is not ``config.hidden_size`` where a model projects out (OPT).

Every write is atomic (temp file, fsync, ``os.replace``); the manifest exists before the first
shard, and a shard is written before the manifest that lists it, with its sha256, checked on
load. So the only shard a manifest may fail to list is the next one a killed write left (it is
overwritten); any other unlisted shard, or shards without a manifest, is refused rather than
overwritten: data on disk is never destroyed.

An adapt run archives a batch before writing its records, as ``pending`` shards; they are
committed once the records are durable. A resumed run (``recorded``: the ids with a record)
keeps a pending entry whose problem has a record and drops the others (the manifest lists the
dropped shards before their files go), so the memory never holds a problem without a record.
Under DDP every rank holds the same entries and rank 0 alone writes the folder (``writes=False``
on the others).

In RAM every tensor is kept, with the L2-normalised ``e`` rows cached as one ``[N, D]``
matrix: a query is one matmul and a ``topk`` (exact cosine), or faiss ``IndexFlatIP`` with
``backend="faiss"``. One process writes a memory at a time; others may read it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from lit_latent.config import UserError
from lit_latent.results import write_atomic

MANIFEST = "manifest.json"
FORMAT = "lit_latent.memory/1"


@dataclass
class Neighbours:
    """The retrieved entries of one query, best first."""

    e: Tensor  # [k, D]
    z_base: Tensor  # [k, L', d]
    z_star: Tensor  # [k, L', d]
    similarity: Tensor  # [k], cosine
    ids: list[str]
    answers: Optional[list[Tensor]] = None  # [L_j, d] each: the latents of the answer the search found ([0, d]: none)
    iterations: Optional[list[int]] = None  # the iterations the search that found it spent
    scores: Optional[list[float]] = None
    keys: Optional[list[tuple[int, int]]] = None  # problem_keys of each entry's problem ((0, 0): not kept)

    def to(self, device) -> "Neighbours":
        answers = None if self.answers is None else [a.to(device) for a in self.answers]
        return Neighbours(self.e.to(device), self.z_base.to(device), self.z_star.to(device), self.similarity.to(device), self.ids,
                          answers, self.iterations, self.scores, self.keys)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True) or 1


def problem_keys(prompt_ids: Sequence[int], problem_text: str) -> tuple[int, int]:
    """The keys by which a problem met again is recognised (``evolve.recall``): one of its exact
    prompt (token ids) and one of the numbers its text states, in order (0 when it states none).
    64 bits of sha256 each; 0 never names a prompt, so entries without keys match nothing."""
    numbers = _NUMBER.findall(problem_text)
    return _key(",".join(map(str, prompt_ids))), _key("|".join(numbers)) if numbers else 0


def check_labels(made_with_labels: Optional[bool], run_uses_labels: bool, key: str, where) -> None:
    """Refuse a memory or weaver made under a reward that read the gold labels in a run whose
    reward does not: its latents were steered by the answers, so the run's results would be too.
    ``key``: the config key that named it (``memory.path``, ``weaver.checkpoint``)."""
    if made_with_labels and not run_uses_labels:
        raise UserError(
            f"config key {key}: {where} was made under a reward that uses the gold labels (e.g. verifier), "
            f"and this run's reward does not: it would carry the labels into the answers; use another {key} "
            "or a reward that uses labels"
        )


class _Rows:
    """A tensor that grows by rows with doubling capacity, so appends are amortised O(rows added)."""

    def __init__(self) -> None:
        self.buf: Optional[Tensor] = None
        self.n = 0

    def append(self, rows: Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty((max(len(rows), 64), *rows.shape[1:]), dtype=rows.dtype)
        elif self.n + len(rows) > len(self.buf):
            grown = torch.empty((max(2 * len(self.buf), self.n + len(rows)), *self.buf.shape[1:]), dtype=self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + len(rows)] = rows
        self.n += len(rows)

    def view(self) -> Optional[Tensor]:
        return None if self.buf is None else self.buf[: self.n]


def _normalise(e: Tensor) -> Tensor:
    return torch.nn.functional.normalize(e.float(), dim=-1)


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


class EpisodicMemory:
    """Episodic memory of one model; ``path=None`` keeps it in RAM only (tests, benchmarks)."""

    def __init__(self, path: Union[str, Path, None], model_id: str, hidden_size: int, backend: str = "torch",
                 reward: Optional[str] = None, uses_labels: Optional[bool] = None, recorded: Optional[set] = None,
                 writes: bool = True):
        """``hidden_size``: the latent size ``d`` (``heads.latent_size(model)``). ``reward`` and
        ``uses_labels``: the kind of reward that scores the entries this process adds, and whether
        it reads gold labels (recorded in the manifest; None: not said). ``recorded``: the problem
        ids the resumed run has records of, to settle pending entries (None: pending entries are
        left on disk as they are and not loaded). ``writes=False``: load the folder but keep what
        is added, and the settling of pending entries, in RAM (a DDP rank other than 0)."""
        self.path = None if path is None else Path(path)
        self.writes = writes
        self.model_id = str(model_id)
        self.hidden_size = int(hidden_size)
        self.backend = backend
        self.reward, self.run_uses_labels = reward, uses_labels
        self.rewards: list[str] = []  # the reward kinds of the entries held
        self._uses_labels: Optional[bool] = None  # whether any entry held was scored with gold labels
        self._index: dict[str, int] = {}  # problem id -> row
        self.e_size: Optional[int] = None  # D, set by the first entry
        self.latent_count: Optional[int] = None  # L', set by the first entry
        self._ids: list[str] = []
        self._scores: list[float] = []
        self._id_set: set[str] = set()
        self._shards: list[dict] = []  # manifest entries
        self._dropped: list[str] = []  # shard files a resume dropped (pending entries without a record)
        self._e, self._e_unit, self._z_base, self._z_star = _Rows(), _Rows(), _Rows(), _Rows()
        self._answers: list[Tensor] = []  # per entry, [L, d] ([0, d]: no answer archived)
        self._iterations: list[int] = []
        self._keys: list[tuple[int, int]] = []
        self._faiss_index = None
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise UserError("memory.backend=faiss needs faiss: pip install lit_latent[faiss] (or use memory.backend=torch)") from None
        elif backend != "torch":
            raise UserError(f"config key memory.backend: {backend!r} is not one of torch, faiss")
        if self.path is not None:
            self._open(recorded)

    @classmethod
    def open(cls, path: Union[str, Path], backend: str = "torch") -> "EpisodicMemory":
        """Load an existing memory, whatever its model (train.py, which has no model of its own)."""
        manifest = _read_manifest(Path(path))
        if manifest is None:
            _check_shards(Path(path), None)
            raise UserError(f"no episodic memory at {path} ({MANIFEST} not found)")
        return cls(path, manifest["model_id"], manifest["hidden_size"], backend)

    # --- loading -------------------------------------------------------------------------------

    def _open(self, recorded: Optional[set]) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"memory.path {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(self.path)
        _check_shards(self.path, manifest)
        if manifest is None:
            return
        if manifest["model_id"] != self.model_id or manifest["hidden_size"] != self.hidden_size:
            raise UserError(
                f"memory at {self.path} was made with model {manifest['model_id']} (hidden {manifest['hidden_size']}), "
                f"not {self.model_id} (hidden {self.hidden_size})"
            )
        self.e_size, self.latent_count = manifest.get("e_size"), manifest.get("latent_count")
        self.rewards, self._uses_labels = list(manifest.get("rewards", [])), manifest.get("uses_labels")
        self._dropped = list(manifest.get("dropped", []))
        settled, readd = False, []
        for shard in manifest["shards"]:
            ids, scores = [str(i) for i in shard["ids"]], [float(s) for s in shard["scores"]]
            entry = {k: v for k, v in shard.items() if k not in ("ids", "scores")} | {"ids": ids, "scores": scores}
            if shard.get("pending") and recorded is None:
                self._shards.append(entry)  # a running (or killed) adapt run's: not ours to settle
                continue
            e, z_base, z_star, answers, iterations, keys = self._load_shard(shard["file"], shard.get("sha256"), ids, scores)
            if shard.get("pending"):
                settled = True
                keep = [j for j, pid in enumerate(ids) if pid in recorded]
                if len(keep) < len(ids):  # entries of problems without a record: a killed batch's
                    self._dropped.append(shard["file"])
                    if keep:  # (a record set aside as corrupt): the others are archived again below
                        rows = torch.tensor(keep)
                        readd.append((e[rows], z_base[rows], z_star[rows], [scores[j] for j in keep], [ids[j] for j in keep],
                                      [answers[j] for j in keep], [iterations[j] for j in keep], [keys[j] for j in keep]))
                    continue
                entry.pop("pending")
            self._append(e, z_base, z_star, scores, ids, answers, iterations, keys)
            self._shards.append(entry)
        if settled and self.writes:
            dropped = [f for f in self._dropped if (self.path / f).exists()]
            self._write_manifest(self._shards)
            for f in dropped:  # listed as dropped first, so a kill here leaves nothing unlisted
                (self.path / f).unlink(missing_ok=True)
            if dropped:
                print(f"memory at {self.path}: dropped the pending entries of problems without a record "
                      f"({', '.join(dropped)}): those problems are redone")
        for args in readd:
            self.add(*args)

    def _load_shard(self, name: str, sha256: Optional[str], ids: list[str], scores: list[float]):
        from safetensors.torch import load as load_bytes

        file = self.path / name
        if not file.is_file():
            raise UserError(f"memory at {self.path}: shard {name} listed in {MANIFEST} is missing")
        data = file.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise UserError(f"memory at {self.path}: shard {name} fails its sha256 check (the file changed after it was "
                            f"written): restore it from a copy, or move the memory folder away to start a new one")
        try:
            tensors = load_bytes(data)
            e, z_base, z_star = tensors["e"], tensors["z_base"], tensors["z_star"]
            answers, iterations = _answers_of(tensors, len(ids), self.hidden_size)
            keys = _keys_of(tensors, len(ids))
        except Exception as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise UserError(f"memory at {self.path}: shard {name} is unreadable or truncated ({reason})") from None
        expected = (len(ids), self.latent_count, self.hidden_size)
        shapes = (tuple(e.shape), tuple(z_base.shape), tuple(z_star.shape))
        if len(scores) != len(ids) or shapes != ((len(ids), self.e_size), expected, expected):
            raise UserError(f"memory at {self.path}: shard {name} does not match {MANIFEST} (shapes or entry count)")
        return e, z_base, z_star, answers, iterations, keys

    def _write_manifest(self, shards: list[dict], **fields) -> None:
        manifest = {
            "format": FORMAT, "model_id": self.model_id, "hidden_size": self.hidden_size, "e_size": self.e_size,
            "latent_count": self.latent_count, "entries": sum(len(s["ids"]) for s in shards), "rewards": self.rewards,
            "uses_labels": self._uses_labels, "shards": shards,
        }
        manifest.update(fields)
        if self._dropped:
            manifest["dropped"] = self._dropped
        text = json.dumps(manifest)
        write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def commit(self) -> None:
        """Mark the pending shards committed: their problems' records are durable now."""
        if self.path is None or not self.writes or not any(s.get("pending") for s in self._shards):
            return
        self._shards = [{k: v for k, v in s.items() if k != "pending"} for s in self._shards]
        self._write_manifest(self._shards)

    # --- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def uses_labels(self) -> Optional[bool]:
        """True when an entry held was scored by a reward that reads gold labels; None when a
        writer did not say (memories from before the field, or made without ``uses_labels``)."""
        return self._uses_labels

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def scores(self) -> list[float]:
        return list(self._scores)

    def __contains__(self, problem_id: str) -> bool:
        return str(problem_id) in self._id_set

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """All ``e [N, D]``, ``z_base [N, L', d]``, ``z_star [N, L', d]`` (views: do not modify)."""
        if not self._ids:
            empty_z = torch.empty(0, self.latent_count or 0, self.hidden_size)
            return torch.empty(0, self.e_size or self.hidden_size), empty_z, empty_z.clone()
        return self._e.view(), self._z_base.view(), self._z_star.view()

    def search(self, e: Tensor, k: int, exclude_ids: Optional[Sequence[Iterable[str]]] = None) -> list[Neighbours]:
        """Per query row of ``e [B, D]`` (or one ``[D]``): the top-k entries by cosine similarity,
        on ``e``'s device. ``exclude_ids[b]``: ids query ``b`` must not retrieve (its own problem's):
        it gets the best k of the others."""
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        queries = _normalise(e.detach().cpu().reshape(-1, e.shape[-1]))
        exclude = [set() for _ in range(len(queries))] if exclude_ids is None else [{str(i) for i in x} for x in exclude_ids]
        if len(exclude) != len(queries):
            raise ValueError(f"got {len(exclude)} exclude_ids rows for {len(queries)} queries")
        if not self._ids:
            return [self._gather(torch.empty(0, dtype=torch.long), torch.empty(0)).to(e.device) for _ in range(len(queries))]
        if queries.shape[1] != self.e_size:
            raise ValueError(f"query size {queries.shape[1]} != memory embedding size {self.e_size}")
        rows = [[self._index[i] for i in x if i in self._index] for x in exclude]
        wanted = min(k, len(self._ids))
        found = []
        if self._faiss_index is not None:
            # the excluded entries may be among the first hits: ask for that many more
            depth = min(wanted + max(len(r) for r in rows), len(self._ids))
            sims, index = self._faiss_index.search(queries.numpy(), depth)
            for b, (s, i) in enumerate(zip(torch.from_numpy(sims), torch.from_numpy(index).long())):
                keep = [j for j, row in enumerate(i.tolist()) if row not in rows[b]][:wanted]
                found.append((i[keep], s[keep]))
        else:
            all_sims = queries @ self._e_unit.view().T  # [B, N]
            for b, r in enumerate(rows):
                all_sims[b, r] = float("-inf")
            sims, index = torch.topk(all_sims, wanted, dim=1)  # [B, N] -> [B, k]
            for b, (i, s) in enumerate(zip(index, sims)):
                keep = torch.isfinite(s)  # fewer than k entries left after the exclusion
                found.append((i[keep], s[keep]))
        return [self._gather(i, s).to(e.device) for i, s in found]

    def _gather(self, index: Tensor, sims: Tensor) -> Neighbours:
        if not self._ids:
            e, z_base, z_star = self.tensors()
            return Neighbours(e, z_base, z_star, sims, [])
        # index_select, not x[index]: advanced indexing of the 3-D buffers costs O(N) here
        rows = index.tolist()
        return Neighbours(
            self._e.view().index_select(0, index), self._z_base.view().index_select(0, index),
            self._z_star.view().index_select(0, index), sims, [self._ids[i] for i in rows],
            [self._answers[i] for i in rows], [self._iterations[i] for i in rows], [self._scores[i] for i in rows],
            [self._keys[i] for i in rows],
        )

    # --- writing -------------------------------------------------------------------------------

    def add(self, e: Tensor, z_base: Tensor, z_star: Tensor, scores: list[float], problem_ids: list[str],
            answers: Optional[Sequence[Optional[Tensor]]] = None, iterations: Optional[Sequence[int]] = None,
            keys: Optional[Sequence[Optional[tuple[int, int]]]] = None, pending: bool = False) -> None:
        """Archive a batch ``e [B, D]``, ``z_base``/``z_star [B, L', d]`` as one new shard; known ids are skipped.
        ``answers[b]``: the latents ``[L_b, d]`` of the answer the search found (None: none);
        ``iterations[b]``: the iterations that search spent. ``keys[b]``: its problem's
        ``problem_keys`` (None: not kept). ``pending``: the batch's records are not
        written yet (``commit`` once they are)."""
        n = len(problem_ids)
        if e.dim() != 2 or z_base.dim() != 3 or z_base.shape != z_star.shape or not (len(e) == len(z_base) == len(scores) == n):
            raise ValueError(
                f"add needs e [B, D], z_base and z_star [B, L, d] and B scores and ids; got e {tuple(e.shape)}, "
                f"z_base {tuple(z_base.shape)}, z_star {tuple(z_star.shape)}, {len(scores)} scores, {n} ids"
            )
        if z_base.shape[2] != self.hidden_size:
            raise ValueError(f"latents have size {z_base.shape[2]}, the memory's model has latent size {self.hidden_size}")
        if self.latent_count is not None and z_base.shape[1] != self.latent_count:
            where = f"memory at {self.path}" if self.path else "the memory"
            raise UserError(
                f"{where} holds {self.latent_count} latents per entry, got {z_base.shape[1]}: "
                f"set evolve.latent_count={self.latent_count} or use another memory.path"
            )
        if self.e_size is not None and e.shape[1] != self.e_size:
            raise ValueError(f"embedding size {e.shape[1]} != the memory's {self.e_size}")
        ids = [str(i) for i in problem_ids]
        keep, seen = [], set()
        for row, pid in enumerate(ids):  # never a problem id twice, within the batch either
            if pid not in self._id_set and pid not in seen:
                keep.append(row)
                seen.add(pid)
        if not keep:
            return
        rows = torch.tensor(keep)
        e, z_base, z_star = (x.detach().cpu().float()[rows].contiguous() for x in (e, z_base, z_star))
        ids, scores = [ids[i] for i in keep], [float(scores[i]) for i in keep]
        none = torch.empty(0, self.hidden_size)
        answers = [none if answers is None or answers[i] is None else answers[i].detach().cpu().float().reshape(-1, self.hidden_size)
                   for i in keep]
        iterations = [0 if iterations is None else int(iterations[i]) for i in keep]
        found = {"answer": torch.cat(answers).contiguous(), "answer_length": torch.tensor([len(a) for a in answers]),
                 "iterations": torch.tensor(iterations)} if any(len(a) for a in answers) else {}
        keys = [(0, 0) if keys is None or keys[i] is None else (int(keys[i][0]), int(keys[i][1])) for i in keep]
        if any(k != (0, 0) for k in keys):
            found |= {"prompt_key": torch.tensor([k[0] for k in keys], dtype=torch.int64),
                      "numbers_key": torch.tensor([k[1] for k in keys], dtype=torch.int64)}
        e_size, latent_count = e.shape[1], z_base.shape[1]
        rewards = self.rewards + [self.reward] if self.reward and self.reward not in self.rewards else self.rewards
        # labels once used stay recorded; "no labels" only when every writer said so
        uses_labels = True if self._uses_labels or self.run_uses_labels else (
            False if self.run_uses_labels is False and (self._uses_labels is False or not len(self)) else None)
        if self.path is not None and self.writes:
            from safetensors.torch import save as save_bytes

            if not (self.path / MANIFEST).is_file():  # before the first shard: no shard is ever without a manifest
                self._write_manifest([])
            # numbering continues after every shard the manifest knows; the unlisted leftover of a crash is overwritten
            name = _next_shard(self._shards, self._dropped)
            data = save_bytes({"e": e, "z_base": z_base, "z_star": z_star, **found})
            write_atomic(self.path / name, lambda tmp: tmp.write_bytes(data))
            shard = {"file": name, "ids": ids, "scores": scores, "sha256": hashlib.sha256(data).hexdigest()}
            shards = self._shards + [shard | {"pending": True} if pending else shard]
            self._write_manifest(shards, e_size=e_size, latent_count=latent_count, rewards=rewards, uses_labels=uses_labels)
            self._shards = shards
        # RAM changes only once the manifest is on disk
        self.e_size, self.latent_count = e_size, latent_count
        self.rewards, self._uses_labels = rewards, uses_labels
        self._append(e, z_base, z_star, scores, ids, answers, iterations, keys)

    def _append(self, e: Tensor, z_base: Tensor, z_star: Tensor, scores: list[float], ids: list[str],
                answers: list[Tensor], iterations: list[int], keys: list[tuple[int, int]]) -> None:
        unit = _normalise(e)
        self._answers.extend(answers)
        self._iterations.extend(iterations)
        self._keys.extend(keys)
        self._e.append(e)
        self._e_unit.append(unit)
        self._z_base.append(z_base)
        self._z_star.append(z_star)
        self._index.update((pid, len(self._ids) + j) for j, pid in enumerate(ids))
        self._ids.extend(ids)
        self._id_set.update(ids)
        self._scores.extend(scores)
        if self.backend == "faiss":
            import faiss

            if self._faiss_index is None:
                self._faiss_index = faiss.IndexFlatIP(unit.shape[1])
            self._faiss_index.add(unit.numpy())


def _shard_number(name: str) -> int:
    return int(name[6:12])


def _next_shard(shards: list[dict], dropped: list[str]) -> str:
    return _shard_name(max([_shard_number(s["file"]) for s in shards] + [_shard_number(f) for f in dropped], default=0) + 1)


def _check_shards(path: Path, manifest: Optional[dict]) -> None:
    """Refuse a folder holding shards its manifest does not know (a lost or older manifest):
    writing there would overwrite them. The one allowed is the next shard, a killed write's."""
    if not path.is_dir():
        return
    on_disk = sorted(f.name for f in path.glob("shard-*.safetensors"))
    if manifest is None:
        if on_disk:
            raise UserError(f"memory at {path} holds {len(on_disk)} shards but no {MANIFEST}: restore {MANIFEST} from a copy, "
                            f"or move the shards away to start a new memory (writing here would overwrite them)")
        return
    known = {s["file"] for s in manifest["shards"]} | set(manifest.get("dropped", []))
    stray = [f for f in on_disk if f not in known and f != _next_shard(manifest["shards"], manifest.get("dropped", []))]
    if stray:
        raise UserError(f"memory at {path}: {MANIFEST} does not list {len(stray)} of its shards ({', '.join(stray[:3])}"
                        f"{', ...' if len(stray) > 3 else ''}): restore the {MANIFEST} that lists them, or move them away")


def _answers_of(tensors: dict[str, Tensor], n: int, d: int) -> tuple[list[Tensor], list[int]]:
    """A shard's answers (``[0, d]`` each where it holds none) and iterations."""
    if "answer" not in tensors:
        return [torch.empty(0, d) for _ in range(n)], [0] * n
    lengths = tensors["answer_length"].tolist()
    if len(lengths) != n or sum(lengths) != len(tensors["answer"]):
        raise ValueError(f"answer lengths {sum(lengths)} do not match the {len(tensors['answer'])} answer rows")
    return list(torch.split(tensors["answer"], lengths)), [int(i) for i in tensors["iterations"].tolist()]


def _keys_of(tensors: dict[str, Tensor], n: int) -> list[tuple[int, int]]:
    """A shard's problem keys ((0, 0) each where it holds none: written before keys were kept)."""
    if "prompt_key" not in tensors:
        return [(0, 0)] * n
    return list(zip(tensors["prompt_key"].tolist(), tensors["numbers_key"].tolist()))


def _read_manifest(path: Path) -> Optional[dict]:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        for key in ("model_id", "hidden_size", "shards"):
            manifest[key]
    except (ValueError, KeyError, TypeError) as err:
        reason = (str(err).splitlines() or [""])[0]
        raise UserError(f"memory at {path}: {MANIFEST} is unreadable ({type(err).__name__}: {reason})") from None
    return manifest
