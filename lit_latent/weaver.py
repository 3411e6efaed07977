"""LatentEvolve's latent weaver ``W(e, z_base) -> z*``, trained on the episodic memory with MSE.

Both kinds are residual, ``z_base + delta`` with the last linear of ``delta`` zero-initialised,
so an untrained weaver is exactly the identity and training starts from "change nothing":

* ``transformer`` (default): ``e`` becomes a conditioning token in front of the ``L'`` latents;
  a few pre-norm ``nn.TransformerEncoder`` layers with learned positions read them.
* ``lora``: a local HF causal LM (the paper uses Qwen2.5-1.5B) reads projections of ``e`` and
  ``z_base`` as ``inputs_embeds``; only LoRA adapters on its attention projections (on a
  backbone without them, e.g. Mamba: on every linear layer of its blocks) and the in/out
  projections train, the backbone stays frozen.

A checkpoint is a folder with ``weaver.safetensors`` (for ``lora``: adapters and projections
only, the backbone is reloaded from ``backbone_path``) and ``weaver.json`` (the weaver config,
latent size under the key ``hidden_size``, embedding size, latent count, model id, and whether
the memory it learned from was scored with gold labels: ``uses_labels``).

``hidden_size`` everywhere here is the latent size ``d``, ``lm_head``'s input
(``heads.latent_size``): OPT models that project out have latents smaller than their hidden size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning.pytorch.utilities import rank_zero_only

from lit_latent.config import TrainerConfig, UserError, WeaverConfig
from lit_latent.results import write_atomic

WEIGHTS, META = "weaver.safetensors", "weaver.json"
FORMAT = "lit_latent.weaver/1"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _zero(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class TransformerWeaver(nn.Module):
    """Small residual transformer over ``[e token, z_1 .. z_L']``; untrained it is the identity."""

    kind = "transformer"

    def __init__(self, hidden_size: int, e_size: int, latent_count: int, layers: int = 2, heads: int = 4, width: Optional[int] = None):
        super().__init__()
        width = width or min(hidden_size, 512)  # a 7B model's 3584 would make a 300M-parameter weaver
        if width % heads:
            raise UserError(f"config key weaver.heads: {heads} heads do not divide the weaver width {width}")
        self.hidden_size, self.e_size, self.latent_count, self.width = hidden_size, e_size, latent_count, width
        self.e_in = nn.Sequential(nn.LayerNorm(e_size), nn.Linear(e_size, width))
        self.z_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.pos = nn.Parameter(torch.randn(latent_count + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), _zero(nn.Linear(width, hidden_size)))

    def forward(self, e: Tensor, z_base: Tensor) -> Tensor:
        """``e [B, D]``, ``z_base [B, L, d]`` (L <= L') -> ``z [B, L, d]`` in z_base's dtype."""
        dtype = self.pos.dtype
        z = z_base.to(dtype)
        tokens = torch.cat([self.e_in(e.to(dtype)).unsqueeze(1), self.z_in(z)], dim=1)  # [B, 1 + L, width]
        hidden = self.encoder(tokens + self.pos[: tokens.shape[1]])[:, 1:]
        return (z + self.out(hidden)).to(z_base.dtype)

    def saved_state(self) -> dict[str, Tensor]:
        return self.state_dict()

    def reset_to_identity(self) -> None:
        _zero(self.out[-1])


class LoraWeaver(nn.Module):
    """A frozen HF causal LM with LoRA on its attention projections, reading ``[e, z_1 .. z_L']``."""

    kind = "lora"

    def __init__(self, backbone_path: str, hidden_size: int, e_size: int, latent_count: int, lora_r: int = 8, lora_alpha: int = 16):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if not Path(backbone_path).is_dir():
            raise UserError(f"config key weaver.backbone_path: {backbone_path} is not a model directory")
        backbone = _load_backbone(backbone_path)
        # what inputs_embeds and last_hidden_state hold: OPT projects them in and out of its hidden size
        width = backbone.get_input_embeddings().weight.shape[-1]
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0)
        lora.target_modules = lora_targets(backbone, lora)
        try:
            self.backbone = get_peft_model(backbone, lora)  # freezes every backbone weight, adds trainable adapters
        except ValueError as err:  # no target peft knows for this architecture
            raise UserError(f"config key weaver.backbone_path: {backbone_path} ({backbone.config.model_type}) has no "
                            f"layer LoRA can adapt: {(str(err).splitlines() or [''])[0]}") from None
        self.hidden_size, self.e_size, self.latent_count, self.width = hidden_size, e_size, latent_count, width
        self.backbone_path = str(backbone_path)
        self.e_in = nn.Sequential(nn.LayerNorm(e_size), nn.Linear(e_size, width))
        self.z_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.out = _zero(nn.Linear(width, hidden_size))

    def forward(self, e: Tensor, z_base: Tensor) -> Tensor:
        dtype = self.out.weight.dtype
        z = z_base.to(dtype)
        embeds = torch.cat([self.e_in(e.to(dtype)).unsqueeze(1), self.z_in(z)], dim=1)  # [B, 1 + L, width]
        hidden = self.backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, 1:]  # at the z positions
        return (z + self.out(hidden.to(dtype))).to(z_base.dtype)

    def saved_state(self) -> dict[str, Tensor]:
        """Adapters and projections: the frozen backbone is reloaded from its directory."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}

    def reset_to_identity(self) -> None:
        _zero(self.out)


def lora_targets(backbone: nn.Module, lora) -> Optional[list[str]]:
    """The backbone's attention projections; where it has none (Mamba's blocks mix tokens with a
    convolution and a state-space scan), every linear layer inside its blocks that peft accepts
    for it; None (peft's default for the architecture, e.g. GPT-2's ``Conv1D``) where it has neither."""
    linear = [name for name, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    names = {name.rsplit(".", 1)[-1] for name in linear}
    attention = [p for p in ATTENTION_PROJECTIONS if p in names]
    if attention:
        return attention
    # inside a block: a numbered layer in the path (layers.0.mixer.in_proj), not a top-level projection
    in_blocks = sorted({name.rsplit(".", 1)[-1] for name in linear if any(part.isdigit() for part in name.split(".")[:-1])})
    return [name for name in in_blocks if _peft_accepts(backbone, lora, name)] or None


def _peft_accepts(backbone: nn.Module, lora, name: str) -> bool:
    # peft refuses some targets per architecture (Mamba's out_proj, whose weight its fused kernels
    # read directly, so an adapter there would be skipped): asked one name at a time
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a peft without the check: it refuses nothing
        return True
    try:
        check(lora, backbone, name)
    except ValueError:
        return False
    return True


def _load_backbone(path: str) -> nn.Module:
    """The causal LM's base model, without its LM head: only hidden states are read."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the unused lm_head.weight; missing keys are checked below
    try:
        backbone, info = AutoModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"config key weaver.backbone_path: {path} lacks {len(missing)} backbone weights (e.g. {missing[0]})")
    return backbone


def build_weaver(cfg: WeaverConfig, hidden_size: int, e_size: int, latent_count: int, backbone_path: Optional[str] = None) -> nn.Module:
    """A fresh (identity) weaver of ``cfg.kind``; ``lora`` needs a backbone directory."""
    if cfg.kind == "lora":
        backbone = backbone_path or cfg.backbone_path
        if not backbone:
            raise UserError("config key weaver.backbone_path: required for weaver.kind=lora (a local HF causal LM directory)")
        return LoraWeaver(str(backbone), hidden_size, e_size, latent_count, cfg.lora_r, cfg.lora_alpha)
    return TransformerWeaver(hidden_size, e_size, latent_count, cfg.layers, cfg.heads)


# --- checkpoints ----------------------------------------------------------------------------------


def save_weaver(weaver: nn.Module, cfg: WeaverConfig, out_dir: Union[str, Path], hidden_size: int, model_id: str,
                uses_labels: Optional[bool] = None) -> Path:
    """Write ``weaver.safetensors`` then ``weaver.json`` (atomically) into ``out_dir``; returns ``out_dir``.
    ``uses_labels``: whether its memory was scored with gold labels (``EpisodicMemory.uses_labels``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = dataclasses.asdict(cfg)
    if weaver.kind == "lora":
        fields["backbone_path"] = weaver.backbone_path
    meta = {
        "format": FORMAT, "weaver": fields, "hidden_size": int(hidden_size), "e_size": weaver.e_size,
        "latent_count": weaver.latent_count, "model_id": str(model_id), "uses_labels": uses_labels,
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weaver.saved_state().items()}
    write_atomic(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    write_atomic(out / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8"))
    return out


def weights_sha256(weaver: nn.Module) -> str:
    """sha256 of the weights a weaver holds now (its saved state, by name), to compare copies."""
    digest = hashlib.sha256()
    for name, tensor in sorted(weaver.saved_state().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_weaver(
    path: Union[str, Path], hidden_size: int, model_id: str, latent_count: Optional[int] = None, backbone_path: Optional[str] = None
) -> nn.Module:
    """A weaver saved by :func:`save_weaver`, in eval mode and frozen; refuses another model's checkpoint.
    Its ``uses_labels`` attribute says whether it learned from label-scored memories (None: not recorded);
    ``memory.check_labels`` refuses it in a run without labels.

    ``latent_count``: also require this L'. ``backbone_path``: for ``lora``, where the backbone is now.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    meta_file, weights_file = folder / META, folder / WEIGHTS
    if not meta_file.is_file() or not weights_file.is_file():
        raise UserError(f"weaver checkpoint {folder}: {META} and {WEIGHTS} not found there (train one with train.py)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        cfg = WeaverConfig(**meta["weaver"])
        saved_hidden, saved_model, e_size, saved_count = meta["hidden_size"], meta["model_id"], meta["e_size"], meta["latent_count"]
    except UserError as err:
        raise UserError(f"weaver checkpoint {folder}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"weaver checkpoint {folder}: {META} is unreadable ({type(err).__name__}: {err})") from None
    if saved_model != str(model_id) or saved_hidden != int(hidden_size):
        raise UserError(
            f"weaver checkpoint {folder} was trained for model {saved_model} (hidden {saved_hidden}), "
            f"not {model_id} (hidden {hidden_size})"
        )
    if latent_count is not None and saved_count != latent_count:
        raise UserError(f"weaver checkpoint {folder} was trained on {saved_count} latents per problem, not {latent_count} (evolve.latent_count)")
    weaver = build_weaver(cfg, saved_hidden, e_size, saved_count, backbone_path)
    from safetensors.torch import load_file

    try:
        state = load_file(weights_file)
    except Exception as err:
        raise UserError(f"weaver checkpoint {folder}: {WEIGHTS} is unreadable ({(str(err).splitlines() or [''])[0]})") from None
    expected = weaver.saved_state()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise UserError(
            f"weaver checkpoint {folder}: weights do not match its {META} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {first})"
        )
    weaver.load_state_dict(state, strict=False)
    weaver.uses_labels = meta.get("uses_labels")
    return weaver.eval().requires_grad_(False)


# --- training -------------------------------------------------------------------------------------


class WeaverModule(L.LightningModule):
    """MSE of ``W(e, z_base)`` against ``z*``; AdamW over the weaver's trainable parameters."""

    def __init__(self, weaver: nn.Module, lr: float):
        super().__init__()
        self.weaver = weaver
        self.lr = lr
        self.strict_loading = False  # checkpoints hold saved_state() only (no frozen backbone)

    def forward(self, e: Tensor, z_base: Tensor) -> Tensor:
        return self.weaver(e, z_base)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        e, z_base, z_star = batch
        loss = F.mse_loss(self.weaver(e, z_base).float(), z_star.float())
        self.log("train_mse", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(e), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        e, z_base, z_star = batch
        mse = F.mse_loss(self.weaver(e, z_base).float(), z_star.float())
        self.log("val_mse", mse, prog_bar=True, batch_size=len(e), sync_dist=True)
        # the bar to beat: predicting z_base unchanged (constant, so logged in a flat line)
        self.log("identity_val_mse", F.mse_loss(z_base.float(), z_star.float()), batch_size=len(e), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.weaver.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"weaver.{k}": v for k, v in self.weaver.saved_state().items()}


class _History(L.Callback):
    """Per-epoch train MSE; kept in Lightning checkpoints so a resumed fit reports the whole run."""

    def __init__(self) -> None:
        self.train_mse: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if "train_mse" in trainer.callback_metrics:
            self.train_mse.append(float(trainer.callback_metrics["train_mse"]))

    def state_dict(self) -> dict[str, Any]:
        return {"train_mse": list(self.train_mse)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_mse = list(state["train_mse"])


@dataclass
class FitResult:
    path: Path
    """The checkpoint folder (written by rank 0)."""
    val_mse: float
    """Validation MSE of the saved weights."""
    identity_val_mse: float
    """Validation MSE of predicting z_base unchanged."""
    train_mse_first: float
    """Train MSE of the first epoch."""
    train_mse_last: float
    """Train MSE of the last epoch."""
    epochs: int = 0
    """Epochs run (early stopping usually ends before weaver.max_epochs)."""
    identity: bool = False
    """True when no epoch beat the identity on validation, so the identity weaver was saved."""


def fit_weaver(
    e: Tensor, z_base: Tensor, z_star: Tensor, cfg: WeaverConfig, trainer_cfg: TrainerConfig, out_dir: Union[str, Path],
    seed: int, hidden_size: int, model_id: str, backbone_path: Optional[str] = None, progress_bar: bool = True,
    uses_labels: Optional[bool] = None,
) -> FitResult:
    """Train a fresh weaver on ``(e [N, D], z_base, z_star [N, L', d])``, save the best weights in ``out_dir``.

    Lightning checkpoints go to ``<out_dir>/checkpoints`` (``last.ckpt`` resumes a killed fit of
    the same data and config) and are removed once the weaver is saved.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    n = len(e)
    if n < 2:
        raise UserError(f"the memory holds {n} entries: too small to train the weaver (at least 2, one for validation)")
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    # seeded split: the same memory and seed give the same validation entries
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    val_rows, train_rows = order[:n_val], order[n_val:]
    split = lambda rows: TensorDataset(*(x.index_select(0, rows).float() for x in (e, z_base, z_star)))  # noqa: E731
    train_data, val_data = split(train_rows), split(val_rows)
    loader_gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, generator=loader_gen)
    val_loader = DataLoader(val_data, batch_size=cfg.batch_size)

    with _seeded(seed):  # the caller's random state (e.g. an adapt run's sampling) comes back untouched
        weaver = build_weaver(cfg, hidden_size, e.shape[1], z_base.shape[1], backbone_path)
        module = WeaverModule(weaver, cfg.lr)
        resume = _resume_checkpoint(ckpt_dir, cfg, n, seed, hidden_size, model_id, e.shape[1], z_base.shape[1])

        history = _History()
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_mse", mode="min", save_top_k=1, save_last=True)
        trainer = L.Trainer(
            **trainer_cfg.__dict__,
            max_epochs=cfg.max_epochs,
            callbacks=[EarlyStopping(monitor="val_mse", mode="min", patience=cfg.patience), checkpoint, history],
            logger=CSVLogger(out, name="logs", version=""),
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # fit.json, or a resume
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume)

        # identity_val_mse is constant; after a resume that ran no epoch, recompute it here
        identity_val = float(F.mse_loss(val_data.tensors[1], val_data.tensors[2]))
        best_val = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("inf")
        if checkpoint.best_model_path:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            weaver.load_state_dict({k.removeprefix("weaver."): v for k, v in state.items()}, strict=False)
        identity = not best_val < identity_val  # a weaver worse than "change nothing" would only hurt
        if identity:
            weaver.reset_to_identity()
            best_val = identity_val
        trainer.strategy.barrier()  # every rank has read best.ckpt before rank 0 removes it
        if trainer.is_global_zero:
            save_weaver(weaver, cfg, out, hidden_size, model_id, uses_labels)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a finished fit leaves nothing to resume
        trainer.strategy.barrier()
        first = history.train_mse[0] if history.train_mse else float("nan")
        last = history.train_mse[-1] if history.train_mse else float("nan")
        return FitResult(out, best_val, identity_val, first, last, trainer.current_epoch, identity)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """``seed_everything(seed)`` inside, the python/numpy/torch random states restored after."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    L.seed_everything(seed, verbose=False)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _readable_checkpoint(path: Path) -> bool:
    """``path`` loads and holds what ``Trainer.fit(ckpt_path=...)`` resumes from."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and {"state_dict", "loops", "optimizer_states"} <= ckpt.keys()


def _resume_checkpoint(
    ckpt_dir: Path, cfg: WeaverConfig, n: int, seed: int, hidden_size: int, model_id: str, e_size: int, latent_count: int
) -> Optional[str]:
    """``last.ckpt`` when it comes from a killed fit of the same data and config, else start afresh."""
    key = {"weaver": dataclasses.asdict(cfg), "entries": n, "seed": seed, "hidden_size": hidden_size,
           "model_id": str(model_id), "e_size": e_size, "latent_count": latent_count}
    stamp, last = ckpt_dir / "fit.json", ckpt_dir / "last.ckpt"
    resumable = last.is_file() and stamp.is_file() and _read_json(stamp) == key
    if resumable and not _readable_checkpoint(last):  # every rank reads it: the same decision
        # a truncated or foreign last.ckpt would stop every later fit: this one starts over instead
        if rank_zero_only.rank == 0:
            print(f"warning: {last} is truncated or not a Lightning checkpoint: starting the fit afresh")
        resumable = False
    if rank_zero_only.rank != 0:  # DDP ranks started by rank 0's launcher: same decision, hands off the folder
        return str(last) if resumable else None
    if not resumable:
        if ckpt_dir.exists():
            print(f"not resuming from {ckpt_dir}: it belongs to another fit; starting afresh")
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(stamp, lambda tmp: tmp.write_text(json.dumps(key), encoding="utf-8"))
        return None
    print(f"resuming the weaver fit from {last}")
    return str(last)
