"""Speed of LatentSeek's fast path against the reference implementation's cost profile.

    python benchmarks/adapt_speed.py                       # embedded model, 50 bundled problems, verifier
    python benchmarks/adapt_speed.py --reward self --problems 50
    python benchmarks/adapt_speed.py --model /models/Qwen2.5-1.5B-Instruct --data ../shared/data/gsm8k_test.jsonl \
        --problems 20 --accelerator gpu --dtype bfloat16

Runs, on the same problems in one process: plain CoT, LatentSeek in reference mode (batch 1,
no KV cache, one verification generation at a time) and LatentSeek's fast path (batched,
prompt cache reused, verifications batched). Prints a table, then as its last line:
``speedup: <fast/slow problems-per-second>x accuracy_delta: <fast - slow, points>
bound_ratio: <fast time / ((1 + mean iterations) x CoT time)>``.

    python benchmarks/adapt_speed.py --memory              # peak memory over batch size x iterations

``--memory`` runs the fast path on one batch per point, each point in a fresh process, with
a reward that never passes (every problem runs all its iterations), and prints the peak
memory above the process's level before the run (CUDA: allocator peak; CPU: sampled RSS).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from lit_latent.cli import load_config  # noqa: E402
from lit_latent.config import HELDOUT_PATH, MODEL_DIR, AdaptConfig  # noqa: E402
from lit_latent.runs import quiet_lightning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on GPU, else sampled process RSS."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = self.start = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.01)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def run_method(model, tokenizer, problems, overrides: list[str], cuda: bool, reward=None) -> dict:
    import lightning as L

    from lit_latent.rewards import make_reward
    from lit_latent.data import ProblemDataModule
    from lit_latent.module import LatentAdaptationModule

    cfg: AdaptConfig = load_config(AdaptConfig, [str(ROOT / "configs" / "latentseek.yaml")], overrides)
    module = LatentAdaptationModule(model, tokenizer, cfg, reward or make_reward(cfg.reward))
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False,
                        inference_mode=False, enable_progress_bar=False, enable_model_summary=False)
    batch = 1 if cfg.perf.reference_mode else cfg.data.batch_size
    with PeakMemory(cuda) as mem:
        start = time.perf_counter()
        out = trainer.predict(module, datamodule=ProblemDataModule(problems, batch))
        seconds = time.perf_counter() - start
    records = [r for b in (out or []) for r in b]
    n = len(records)
    if trainer.received_sigterm or trainer.interrupted or n != len(problems):
        # Lightning's predict notes a SIGTERM and goes on: a figure from a stopped run would be wrong
        why = "SIGTERM received" if trainer.received_sigterm else "interrupted"
        sys.exit(f"error: {why} during the {' '.join(overrides[-1:])} run ({n} of {len(problems)} problems): "
                 "an incomplete run gives no figure")
    return {
        "seconds": seconds,
        "problems_per_s": n / seconds,
        "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
        "peak_mb": mem.peak / 2**20,
        "added_mb": (mem.peak - mem.start) / 2**20,
        "accuracy": sum(r["correct"] for r in records) / n,
        "iterations": sum(r.get("iterations", 0) for r in records) / n,
        "answers": [r["final_answer"] for r in records],
    }


def never_pass_reward():
    from lit_latent.rewards import Reward, Scores

    class NeverPass(Reward):
        """Reward 0 for everything: every problem runs latent.max_iterations iterations."""

        def score(self, engine, problems, completions):
            return Scores([0.0] * len(problems), [0] * len(problems))

    return NeverPass()


def memory_point(args, batch: int, iterations: int) -> None:
    """One point of the memory curve, in this process: prints ``added_mb``."""
    from lit_latent.config import ModelConfig
    from lit_latent.data import read_problems
    from lit_latent.generation import load_model

    cuda = args.accelerator in ("gpu", "cuda")
    model, tokenizer = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    if cuda:
        model.cuda()
    problems = read_problems(args.data, batch)
    overrides = [f"model.path={args.model}", f"data.batch_size={batch}", f"trainer.accelerator={args.accelerator}",
                 "data.limit=null", f"latent.max_iterations={iterations}"]
    run_method(model, tokenizer, problems[:2], overrides, cuda, never_pass_reward())  # warm-up: lazy inits, allocator
    r = run_method(model, tokenizer, problems, overrides, cuda, never_pass_reward())
    print(f"added_mb {r['added_mb']:.1f} iterations {r['iterations']:.1f}")


def memory_curve(args) -> None:
    import subprocess

    batches, iterations = (8, 16, 32), (1, 5, 10)
    added = {}
    for b in batches:
        for k in iterations:
            cmd = [sys.executable, __file__, "--memory-point", str(b), str(k), "--model", args.model, "--data", args.data,
                   "--accelerator", args.accelerator, "--dtype", args.dtype, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            added[b, k] = float(out[out.index("added_mb") + 1])
    print(f"\nfast path peak memory above the level before the run (MB), {args.accelerator}, reward never passes")
    print("| batch size | " + " | ".join(f"{k} iterations" for k in iterations) + " |")
    print("|---|" + "---|" * len(iterations))
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{added[b, k]:.1f}" for k in iterations) + " |")
    per_row = [(added[b, iterations[-1]]) / b for b in batches]
    growth = max(added[b, iterations[-1]] - added[b, iterations[0]] for b in batches)
    print(f"memory: per problem {min(per_row):.2f}-{max(per_row):.2f} MB across batch sizes, "
          f"largest growth from {iterations[0]} to {iterations[-1]} iterations {growth:+.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--data", default=str(HELDOUT_PATH))
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--reward", default="verifier", choices=["verifier", "self", "majority"])
    ap.add_argument("--batch-size", type=int, default=50, help="fast-path batch (the slow mode runs one problem at a time)")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--memory", action="store_true", help="peak memory over batch size x iterations instead")
    ap.add_argument("--memory-point", type=int, nargs=2, metavar=("BATCH", "ITERATIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_point:
        return memory_point(args, *args.memory_point)
    if args.memory:
        return memory_curve(args)

    from lit_latent.config import ModelConfig
    from lit_latent.data import read_problems
    from lit_latent.generation import load_model

    cuda = args.accelerator in ("gpu", "cuda")
    model, tokenizer = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    if cuda:
        model.cuda()
    problems = read_problems(args.data, args.problems)
    common = [f"model.path={args.model}", f"reward.kind={args.reward}", f"data.batch_size={args.batch_size}",
              f"trainer.accelerator={args.accelerator}", "data.limit=null"]
    results = {
        "cot": run_method(model, tokenizer, problems, common + ["method=cot"], cuda),
        "slow (reference)": run_method(model, tokenizer, problems, common + ["perf.reference_mode=true"], cuda),
        "fast": run_method(model, tokenizer, problems, common, cuda),
    }
    print(f"\n{len(problems)} problems, reward={args.reward}, model={args.model}, device={args.accelerator}")
    print("| method | problems/s | tokens/s | peak memory (MB) | accuracy | mean iterations | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['problems_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | "
              f"{100 * r['accuracy']:.1f}% | {r['iterations']:.2f} | {r['seconds']:.1f} |")
    fast, slow, cot = results["fast"], results["slow (reference)"], results["cot"]
    same = sum(a == b for a, b in zip(fast["answers"], slow["answers"]))
    print(f"fast and slow agree on {same}/{len(problems)} final answers")
    speedup = fast["problems_per_s"] / slow["problems_per_s"]
    delta = 100 * (fast["accuracy"] - slow["accuracy"])
    bound = fast["seconds"] / ((1 + fast["iterations"]) * cot["seconds"])
    print(f"speedup: {speedup:.2f}x accuracy_delta: {delta:+.1f} bound_ratio: {bound:.2f}")


if __name__ == "__main__":
    main()
