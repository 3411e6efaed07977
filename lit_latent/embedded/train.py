"""Train the embedded model from scratch with a Lightning ``fit`` on CPU.

    python -m lit_latent.embedded.train                      # a model from scratch (45 min on 2 cores; the shipped weights had more fit, see the model card)
    python -m lit_latent.embedded.train --minutes 1 --out /tmp/emb --heldout-out /tmp/emb/heldout.jsonl

Writes the held-out problems, builds the tokenizer, trains a small Llama on a mix of
solving (user ``math_prompt(problem)``, assistant the worked solution) and checking tasks
(``checks.py``), saves a checkpoint every few minutes, then ships the *latest checkpoint
whose greedy accuracy on validation problems lies in the target band* (imperfect by
design, so test-time adaptation has room to improve).

Loss is on assistant tokens only: every solution token weighs 1, a check's verdict token
``VERDICT_WEIGHT``. Otherwise one verdict token drowns among ~40 solution tokens and checks
stay at chance (FEASIBILITY-embedded-model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from lit_latent.prompts import math_prompt
from lit_latent.embedded import HELDOUT_PATH, MODEL_DIR
from lit_latent.embedded.checks import TASKS, check_example, final_example, recompute_example, verdict
from lit_latent.embedded.problems import heldout_problems, train_problems
from lit_latent.embedded.tokenizer import build_tokenizer

# fraction of examples per task; holistic checks share theirs equally. The one-word step check
# gets none: the recompute check is the step-level check the reward uses, and from scratch it
# also speeds up solving. With this mix, bf16, widths padded to 16 and 4096-token batches the
# 45-minute command reached CoT 51.6% (session 9, 4,669 steps; 8192-token batches: 32.6% on
# 2,410 steps; the older mix cot .45 / final .12 / holistic .08 in fp32: 31.8%; model card)
MIX = {"cot": 0.55, "step": 0.0, "final": 0.07, "operand": 0.03, "holistic": 0.05, "recompute": 0.30}
# loss weight of a check's verdict token; every solution token weighs 1. A solution has ~40
# tokens, so checks get ~15% of the gradient instead of ~2% (FEASIBILITY: at 2% they stayed
# at chance), while arithmetic keeps a per-digit signal (normalising solutions per example
# starved it: 18% accuracy after 68 minutes).
VERDICT_WEIGHT = 8.0
# loss weight of each token of a recompute answer (~9 tokens per column, see
# prompts.recompute_answer), so a three-column answer weighs about as much as a solution
RECOMPUTE_WEIGHT = 1.5
# loss weight of each token of a final check's answer (prompts.final_check_answer: the last
# line's result, a few digits)
FINAL_WEIGHT = 2.0
VAL_SEED = 99
MODEL_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=1024)


def padded_width(length: int, multiple: int = 16) -> int:
    """Batches are padded to a multiple of 16 tokens: few distinct shapes, so the CPU matmul
    kernels built for a shape are reused (~1.3x the steps per minute of exact widths in bf16)."""
    return -(-length // multiple) * multiple


def task_group(task: str) -> str:
    return "holistic" if task.startswith("holistic") else task


class ExampleStream(IterableDataset):
    """Endless, seeded, already-collated batches of at most ``max_tokens`` padded tokens."""

    def __init__(self, tokenizer, seed: int, exclude=(), max_tokens: int = 8192, max_batch: int = 128,
                 pool: int = 1024, mix: dict = MIX):
        self.tok, self.seed, self.exclude = tokenizer, seed, set(exclude)
        self.max_tokens, self.max_batch, self.pool, self.mix = max_tokens, max_batch, pool, mix
        self.holistic = [t for t in TASKS if t.startswith("holistic")]

    def examples(self) -> Iterator[tuple[str, str, str]]:
        rng = random.Random(f"mix-{self.seed}")
        names, weights = list(self.mix), list(self.mix.values())
        for p in train_problems(self.seed, self.exclude):
            task = rng.choices(names, weights)[0]
            if task == "cot":
                yield task, math_prompt(p["problem"]), p["solution"]
            elif task == "recompute":
                yield (task, *recompute_example(rng, p))
            elif task == "final":
                yield (task, *final_example(rng, p))
            else:
                task = rng.choice(self.holistic) if task == "holistic" else task
                prompt, label = check_example(rng, p, task)
                yield task, prompt, verdict(label)

    def encode(self, items):
        tok = self.tok
        prompts = [tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False)
                   for _, u, _ in items]
        p_ids = tok(prompts, add_special_tokens=False).input_ids
        a_ids = tok([a for _, _, a in items], add_special_tokens=False).input_ids
        return [(t, p, a + [tok.eos_token_id]) for (t, _, _), p, a in zip(items, p_ids, a_ids)]

    def collate(self, exs):
        width = padded_width(max(len(p) + len(a) for _, p, a in exs))
        B = len(exs)
        ids = torch.full((B, width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), -100, dtype=torch.long)
        weights = torch.zeros((B, width))
        is_check = torch.zeros(B, dtype=torch.bool)
        is_recompute = torch.zeros(B, dtype=torch.bool)
        is_final = torch.zeros(B, dtype=torch.bool)
        for r, (task, p, a) in enumerate(exs):
            seq = p + a
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            labels[r, len(p): len(seq)] = torch.tensor(a)
            if task == "cot":
                weights[r, len(p): len(seq)] = 1.0
            elif task == "recompute":
                weights[r, len(p): len(seq)] = RECOMPUTE_WEIGHT
                is_recompute[r] = True
            elif task == "final":
                weights[r, len(p): len(seq)] = FINAL_WEIGHT
                is_final[r] = True
            else:
                # the verdict token carries the example; eos after it is near-free
                weights[r, len(p): len(seq)] = 0.1
                weights[r, len(p)] = VERDICT_WEIGHT
                is_check[r] = True
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights,
                "is_check": is_check, "is_recompute": is_recompute, "is_final": is_final, "prompt_len": torch.tensor([len(p) for _, p, _ in exs])}

    def __iter__(self):
        rng = random.Random(f"batches-{self.seed}")
        stream = self.examples()
        while True:
            exs = self.encode([next(stream) for _ in range(self.pool)])
            exs.sort(key=lambda e: len(e[1]) + len(e[2]))
            batches, cur = [], []
            for e in exs:
                if cur and ((len(cur) + 1) * padded_width(len(e[1]) + len(e[2])) > self.max_tokens or len(cur) >= self.max_batch):
                    batches.append(cur)
                    cur = []
                cur.append(e)
            batches.append(cur)
            rng.shuffle(batches)
            for b in batches:
                yield self.collate(b)


class EmbeddedLM(L.LightningModule):
    """A small ``LlamaForCausalLM`` and the per-example-normalised assistant-token loss."""

    def __init__(self, model_config: dict, lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 50,
                 minutes: Optional[float] = None, total_steps: Optional[int] = None, min_lr_ratio: float = 0.1,
                 nominal_batch: int = 64):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.save_hyperparameters()
        self.model = LlamaForCausalLM(LlamaConfig(**model_config))
        self.start = None

    def progress(self) -> float:
        if self.hparams.minutes:
            return min(1.0, (time.monotonic() - (self.start or time.monotonic())) / (60 * self.hparams.minutes))
        if self.hparams.total_steps:
            return min(1.0, self.global_step / self.hparams.total_steps)
        return 0.0

    def on_train_start(self):
        self.start = time.monotonic()

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        w = batch["weights"][:, 1:]
        loss = (ce * w).sum() / self.hparams.nominal_batch
        with torch.no_grad():
            chk = batch["is_check"]
            rows = torch.arange(len(chk))
            vpos = batch["prompt_len"] - 1  # position that predicts the verdict
            self.stats = {"loss": loss.item(), "n": len(chk), "n_check": int(chk.sum())}
            if chk.any():
                pred = logits[rows[chk], vpos[chk]].argmax(-1)
                gold = batch["labels"][rows[chk], vpos[chk] + 1]
                self.stats["check_acc"] = (pred == gold).float().mean().item()
                self.stats["check_loss"] = ce[rows[chk], vpos[chk]].mean().item()
            worked = batch["is_recompute"] | batch["is_final"]
            for name, rows_of in (("cot_loss", ~chk & ~worked), ("recompute_loss", batch["is_recompute"]),
                                  ("final_loss", batch["is_final"])):
                if rows_of.any():
                    cw = w[rows_of]
                    self.stats[name] = ((ce[rows_of] * cw).sum() / cw.sum()).item()
        return loss

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr, betas=(0.9, 0.98))

        def factor(step):
            warm = min(1.0, (step + 1) / self.hparams.warmup_steps)
            cos = 0.5 * (1 + math.cos(math.pi * self.progress()))
            return warm * (self.hparams.min_lr_ratio + (1 - self.hparams.min_lr_ratio) * cos)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Report(L.Callback):
    """Prints running averages; saves an HF checkpoint every ``every_minutes``."""

    def __init__(self, ckpt_dir: Optional[Path] = None, every_minutes: float = 3.0, log_every: int = 25):
        self.ckpt_dir, self.every, self.log_every = ckpt_dir, every_minutes, log_every
        self.ema, self.last_save, self.t0 = {}, None, None

    def on_train_start(self, trainer, module):
        self.t0 = self.last_save = time.monotonic()

    def save(self, module, tag: str):
        if self.ckpt_dir is not None:
            module.model.save_pretrained(self.ckpt_dir / tag)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for k, v in module.stats.items():
            self.ema[k] = v if k not in self.ema else 0.95 * self.ema[k] + 0.05 * v
        step, now = trainer.global_step, time.monotonic()
        if step % self.log_every == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(f"step {step} {(now - self.t0) / 60:.1f}min lr {lr:.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in self.ema.items() if k not in ("n", "n_check")), flush=True)
        if now - self.last_save >= 60 * self.every:
            self.last_save = now
            self.save(module, f"step_{step:05d}_{(now - self.t0) / 60:04.1f}min")

    def on_train_end(self, trainer, module):
        self.save(module, f"step_{trainer.global_step:05d}_final")


def model_config(tok, **shape) -> dict:
    return dict(MODEL_SHAPE, **shape, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def fit(tok, out_ckpts: Optional[Path], exclude, minutes: Optional[float] = None, max_steps: int = -1,
        seed: int = 0, shape: Optional[dict] = None, max_tokens: int = 8192, lr: float = 1e-3,
        ckpt_minutes: float = 3.0, log_every: int = 25, init: Optional[Path] = None, mix: Optional[dict] = None,
        precision: str = "bf16-mixed") -> EmbeddedLM:
    L.seed_everything(seed, verbose=False)
    module = EmbeddedLM(model_config(tok, **(shape or {})), lr=lr, minutes=minutes,
                        total_steps=max_steps if max_steps > 0 else None)
    if init is not None:
        from transformers import AutoModelForCausalLM

        module.model.load_state_dict(AutoModelForCausalLM.from_pretrained(init).state_dict())
    data = DataLoader(ExampleStream(tok, seed, exclude, max_tokens=max_tokens, mix=mix or MIX), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, precision=precision,
                        max_time=timedelta(minutes=minutes) if minutes else None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[Report(out_ckpts, ckpt_minutes, log_every)])
    trainer.fit(module, data)
    return module


def save_shipped(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False, max_new_tokens=256)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def select(ckpt_dir: Path, tok, band: tuple[float, float], n_val: int = 150) -> tuple[Path, list]:
    """The latest checkpoint whose validation accuracy is inside ``band`` (else the closest)."""
    from transformers import AutoModelForCausalLM
    from lit_latent.embedded.evaluate import cot_accuracy

    val = heldout_problems(n_val, seed=VAL_SEED)
    table = []
    ckpts = sorted(ckpt_dir.iterdir())
    for d in ckpts[len(ckpts) // 3:]:  # early checkpoints are far below the band
        acc = cot_accuracy(AutoModelForCausalLM.from_pretrained(d).eval(), tok, val)["overall"]
        table.append((d, acc))
        print(f"validation {d.name}: {acc:.1%}", flush=True)
    inside = [(d, a) for d, a in table if band[0] <= a <= band[1]]
    if inside:
        return inside[-1][0], table
    mid = sum(band) / 2
    return min(table, key=lambda t: abs(t[1] - mid))[0], table


def parse_mix(items: list[str], ap: argparse.ArgumentParser) -> dict:
    """``["cot=0.3", "step=0.4", ...]`` -> shares of the tasks of ``MIX``; a task not named gets 0."""
    mix = dict.fromkeys(MIX, 0.0)
    for item in items:
        task, _, share = item.partition("=")
        if task not in MIX:
            ap.error(f"--mix: unknown task {task!r} in {item!r}; tasks: {', '.join(MIX)}")
        try:
            mix[task] = float(share)
        except ValueError:
            ap.error(f"--mix: {item!r} is not TASK=SHARE")
    if any(v < 0 for v in mix.values()) or not sum(mix.values()):
        ap.error(f"--mix: shares must be non-negative and not all 0, got {' '.join(items)}")
    return mix


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock length of fit (cosine lr over it)")
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--out", type=Path, default=MODEL_DIR, help="where the shipped model goes")
    ap.add_argument("--heldout-out", type=Path, default=HELDOUT_PATH)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lit_latent_embedded"), help="checkpoints go here")
    ap.add_argument("--band", type=float, nargs=2, default=(0.40, 0.60), help="validation accuracy band to ship")
    ap.add_argument("--ckpt-minutes", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue from these weights (an HF checkpoint)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer instead of building one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    # twice the optimizer steps of 8192 in the same minutes; early in training they pay more
    ap.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    # bf16 matmuls with fp32 weights: ~1.2x the steps of fp32 in the same minutes on this CPU
    # (avx512_bf16); on a CPU without bf16 instructions pass 32-true
    ap.add_argument("--precision", choices=("bf16-mixed", "32-true"), default="bf16-mixed")
    ap.add_argument("--mix", nargs="+", metavar="TASK=SHARE", default=None,
                    help=f"task shares of the examples (default {' '.join(f'{k}={v}' for k, v in MIX.items())})")
    args = ap.parse_args(argv)
    mix = parse_mix(args.mix, ap) if args.mix else None
    torch.set_num_threads(args.threads)
    t0 = time.time()

    heldout = heldout_problems(1000)
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.heldout_out, "w") as f:
        for p in heldout:
            f.write(json.dumps(p) + "\n")
    val = heldout_problems(200, seed=VAL_SEED)
    exclude = {p["problem"] for p in heldout} | {p["problem"] for p in val}

    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = build_tokenizer()
    ckpts = args.work / "ckpts"
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True)
    tok.save_pretrained(args.work / "tokenizer")
    fit(tok, ckpts, exclude, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
        ckpt_minutes=args.ckpt_minutes, init=args.init, lr=args.lr, mix=mix, precision=args.precision,
        max_tokens=args.max_tokens)
    print(f"fit done after {(time.time() - t0) / 60:.1f} min", flush=True)

    from transformers import AutoModelForCausalLM

    best, table = select(ckpts, tok, tuple(args.band))
    save_shipped(AutoModelForCausalLM.from_pretrained(best), tok, args.out)
    print(f"shipped {best.name} -> {args.out}; total {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
