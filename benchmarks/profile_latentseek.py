"""Where LatentSeek's time goes: cProfile of ``predict`` (model load excluded), in buckets.

    python benchmarks/profile_latentseek.py                       # issue 26's verifier run on the embedded model
    python benchmarks/profile_latentseek.py reward.kind=self reward.scheme=latentseek data.limit=5
    python benchmarks/profile_latentseek.py model.path=/tmp/lit_latent_bench/qwen2-0.5b-shape-random \\
        data.limit=2 generation.max_new_tokens=9 latent.max_iterations=2

Runs ``adapt.py``'s command in this process (1 torch thread unless --threads) under cProfile, then
prints the cumulative seconds of the functions that matter as a share of predict_step's time,
and the top functions by own time. cProfile's per-call overhead inflates Python-heavy parts
(about 1.3-1.5x here); the shares, not the seconds, are the result.

``--kernels`` runs the same command under torch.profiler instead and prints the time spent inside
the matrix-multiply and attention kernels themselves (their own CPU time). Any implementation that
keeps today's records must run these same kernels on the same shapes, so their sum is a floor on
our time: upstream's seconds divided by it bound the ratio ``vs_upstream.py`` can reach. It also
prints their arithmetic (GFLOP, attention counted from its shapes) and the rate they ran at.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ["--config", "configs/latentseek_paper.yaml", "reward.kind=verifier", "latent.rho=0.85", "latent.lr=0.1",
        "generation.max_new_tokens=200", "data.limit=20"]

# (label, file suffix, function name): cumulative time of these
BUCKETS = [
    ("predict_step (all)", "lit_latent/module.py", "predict_step"),
    ("generate(): CoT + regenerations", "lit_latent/generation.py", "generate"),
    ("  transformer forward (all calls)", "models/llama/modeling_llama.py", "forward"),
    ("  transformer forward (qwen2)", "models/qwen2/modeling_qwen2.py", "forward"),
    ("  PromptState.select (cache copies)", "lit_latent/kvcache.py", "select"),
    ("  encode_prompts (prefill)", "lit_latent/kvcache.py", "encode_prompts"),
    ("  extend_prompts (prefix prefill)", "lit_latent/kvcache.py", "extend_prompts"),
    ("  ReservedLayer.batch_select_indices", "lit_latent/kvcache.py", "batch_select_indices"),
    ("reward.score", "lit_latent/rewards.py", "score"),
    ("  engine.complete (verifications)", "lit_latent/engine.py", "complete"),
    ("  generate_branches", "lit_latent/generation.py", "generate_branches"),
    ("LatentSearch.step (backward + Adam)", "lit_latent/search.py", "step"),
    ("  Adam.step", "torch/optim/adam.py", "step"),
    ("  backward", "torch/_tensor.py", "backward"),
    ("token_log_probs (loss)", "lit_latent/latents.py", "token_log_probs"),
    ("decode_latents", "lit_latent/latents.py", "decode_latents"),
    ("judging (extract_answer)", "lit_latent/answers.py", "extract_answer"),
    ("judging (is_equivalent)", "lit_latent/answers.py", "is_equivalent"),
    ("tokenizer: encode_messages", "lit_latent/engine.py", "encode_messages"),
    ("tokenizer: decode", "lit_latent/engine.py", "decode"),
    ("host sync: Tensor.tolist", "~", "<method 'tolist' of 'torch._C.TensorBase' objects>"),
    ("host sync: Tensor.item", "~", "<method 'item' of 'torch._C.TensorBase' objects>"),
    ("host sync: Tensor.__bool__", "~", "<method '__bool__' of 'torch._C.TensorBase' objects>"),
    ("Module._call_impl (all nn modules)", "torch/nn/modules/module.py", "_call_impl"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kernels", action="store_true", help="time the matmul and attention kernels (torch.profiler)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import adapt

    run_dir = Path(tempfile.mkdtemp(prefix="profile_"))
    argv = BASE + args.overrides + [f"run_dir={run_dir}"]
    adapt.main(BASE + ["data.limit=2", f"run_dir={run_dir}/warm"])  # imports, lazy inits
    if args.kernels:
        kernel_floor(adapt, argv, run_dir)
        return
    prof = cProfile.Profile()
    prof.enable()
    adapt.main(argv)
    prof.disable()
    shutil.rmtree(run_dir, ignore_errors=True)
    stats = pstats.Stats(prof)
    total = None
    rows = []
    for label, suffix, name in BUCKETS:
        calls, cum = 0, 0.0
        for (file, _, func), (cc, nc, tt, ct, _) in stats.stats.items():
            if func == name and file.endswith(suffix) or (suffix == "~" and func == name):
                calls, cum = calls + nc, cum + ct
        if total is None:
            total = cum
        if calls:
            rows.append((label, calls, cum))
    print(f"\ncumulative time by part ({' '.join(args.overrides) or 'issue 26 verifier run'}), under cProfile")
    print("| part | calls | seconds | share of predict_step |")
    print("|---|---|---|---|")
    for label, calls, cum in rows:
        print(f"| {label} | {calls} | {cum:.3f} | {100 * cum / total:.1f}% |")
    print(f"\ntop {args.top} by own time")
    stats.sort_stats("tottime").print_stats(args.top)


KERNELS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
}


def kernel_floor(adapt, argv: list[str], run_dir: Path) -> None:
    import time

    from torch.profiler import ProfilerActivity, profile

    from lit_latent.results import read_records

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        adapt.main(argv)
    wall = time.perf_counter() - start
    record_seconds = sum(r["seconds"] for r in read_records(run_dir / "predictions.jsonl"))
    shutil.rmtree(run_dir, ignore_errors=True)
    events = prof.events()
    print(f"\nkernel time ({' '.join(argv)}), under torch.profiler")
    print("| kernels | calls | own seconds | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|")
    floor = 0.0
    for label, names in KERNELS.items():
        mine = [e for e in events if e.name in names]
        seconds = sum(e.self_cpu_time_total for e in mine) / 1e6
        gflop = sum(_flops(e) for e in mine) / 1e9
        floor += seconds
        print(f"| {label} | {len(mine)} | {seconds:.3f} | {gflop:.1f} | {gflop / max(seconds, 1e-9):.0f} |")
    print(f"records' seconds under the profiler: {record_seconds:.3f} (wall {wall:.3f})")
    print(f"kernel_floor_s: {floor:.3f}")


def _flops(event) -> int:
    """The profiler's count for matrix multiplies; for attention (which it does not count), the
    two products of queries [B, H, q, d] with keys [B, H, k, d]: 4 B H q k d."""
    if event.flops:
        return event.flops
    if "attention" in event.name and len(event.input_shapes) >= 2 and len(event.input_shapes[0]) == 4:
        (b, h, q, d), k = event.input_shapes[0], event.input_shapes[1][2]
        return 4 * b * h * q * k * d
    return 0


if __name__ == "__main__":
    main()
