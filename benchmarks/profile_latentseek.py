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
our time: upstream's seconds divided by it bound the ratio ``vs_upstream.py`` can reach.
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        adapt.main(argv)
    wall = time.perf_counter() - start
    record_seconds = sum(r["seconds"] for r in read_records(run_dir / "predictions.jsonl"))
    shutil.rmtree(run_dir, ignore_errors=True)
    own = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}
    print(f"\nkernel time ({' '.join(argv)}), under torch.profiler")
    print("| kernels | calls | own seconds |")
    print("|---|---|---|")
    floor = 0.0
    for label, names in KERNELS.items():
        calls = sum(own[n][0] for n in names if n in own)
        seconds = sum(own[n][1] for n in names if n in own)
        floor += seconds
        print(f"| {label} | {calls} | {seconds:.3f} |")
    print(f"records' seconds under the profiler: {record_seconds:.3f} (wall {wall:.3f})")
    print(f"kernel_floor_s: {floor:.3f}")


if __name__ == "__main__":
    main()
