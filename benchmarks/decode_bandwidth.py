"""Decode speed against the memory-bandwidth limit: how close ``generate`` comes to reading the weights
once per step at the machine's copy bandwidth.

    python benchmarks/decode_bandwidth.py                     # Qwen2-0.5B's shape, random weights (built once)
    python benchmarks/decode_bandwidth.py --size embedded --rows 1 6

A decode step reads every weight of the transformer and the head once (the embedding only one row per
token), so at ``rows`` rows a step cannot take less than ``weight bytes / bandwidth``. The bandwidth is
measured here as a large tensor copy (read + write bytes over seconds, the best of a few), at the same
torch thread count. The model's large layers are packed for oneDNN as ``adapt.py`` packs them on CPU
(``perf.pack_weights``; ``--unpacked``: plain ``F.linear``). Last lines: ``rows=<R> steps/s=<...>
tokens/s=<...> fraction_of_limit=<...>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def copy_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``mb`` MB (read + write counted), the best of ``repeats``."""
    import torch

    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # pages touched
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def streamed_bytes(model) -> int:
    """The bytes a decode step must read: every weight but the input embedding (one row per token);
    a head tied to the embedding is read whole."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["qwen05b", "embedded"], default="qwen05b")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/lit_latent_bench"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unpacked", action="store_true", help="leave the linear layers as transformers made them")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from lit_latent.generation import generate
    from lit_latent.kvcache import encode_prompts
    from lit_latent.packed_linear import pack_linear_weights

    torch.set_num_threads(args.threads)
    if args.size == "qwen05b":
        from benchmarks.vs_upstream import build_qwen05b

        path = build_qwen05b(args.cache_dir / "qwen2-0.5b-shape-random")
    else:
        path = ROOT / "lit_latent" / "embedded" / "model"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    weights = streamed_bytes(model)
    packed = 0 if args.unpacked else pack_linear_weights(model)
    bandwidth = copy_bandwidth()
    limit = bandwidth / weights  # steps per second if a step only streamed the weights
    print(f"model: {path.name}  weights read per step: {weights / 2**20:.1f} MiB  copy bandwidth: {bandwidth / 1e9:.2f} GB/s"
          f"  ({args.threads} thread(s), {packed} layers packed)  limit: {limit:.2f} steps/s")
    vocab = model.config.vocab_size
    for rows in args.rows:
        prompts = [[(7 * r + k) % (vocab - 3) + 3 for k in range(32 + 4 * r)] for r in range(rows)]
        state = encode_prompts(model, prompts, pad_id=0)
        generate(model, prompts, max_new_tokens=2, eos_ids=[-1], pad_id=0, prompt_state=state.select(range(rows)))  # warm
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=args.steps, eos_ids=[-1], pad_id=0, prompt_state=state.select(range(rows)))
        steps_per_s = (args.steps - 1) / (time.perf_counter() - start)  # a forward per token after the first
        print(f"rows={rows} steps/s={steps_per_s:.2f} tokens/s={rows * steps_per_s:.1f} fraction_of_limit={steps_per_s / limit:.2f}")


if __name__ == "__main__":
    main()
