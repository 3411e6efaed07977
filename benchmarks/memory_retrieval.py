"""Single-query retrieval latency of the episodic memory at LatentEvolve scale.

    python benchmarks/memory_retrieval.py                      # 100k entries, D = 192 (the embedded model)
    python benchmarks/memory_retrieval.py --entries 1000000 --backend faiss

Builds a random in-RAM memory (100 adds of 1000 entries, no disk) and times ``search`` of one
query, top-5, over 200 queries. Last line: ``retrieval_p50_ms: <x>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lit_latent.memory import EpisodicMemory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=192, help="D = d, the model's hidden size")
    parser.add_argument("--latents", type=int, default=15, help="L', latents per entry")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--backend", default="torch", choices=["torch", "faiss"])
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    memory = EpisodicMemory(None, "benchmark", args.hidden, backend=args.backend)
    chunk = 1000
    z_chunk = torch.randn(chunk, args.latents, args.hidden)  # latents only travel along: one chunk reused
    for first in range(0, args.entries, chunk):
        n = min(chunk, args.entries - first)
        z = z_chunk[:n]
        memory.add(torch.randn(n, args.hidden), z, z, [1.0] * n, [f"p{first + i}" for i in range(n)])
    print(f"built {len(memory)} entries (D={args.hidden}, L'={args.latents}) in {time.perf_counter() - start:.1f} s")

    queries = torch.randn(args.queries, args.hidden)
    for q in queries[:10]:  # warm-up
        memory.search(q, args.k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        memory.search(q, args.k)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
    print(f"single-query search, top-{args.k}, {args.queries} queries, {torch.get_num_threads()} threads: p50 {p50:.2f} ms, p90 {p90:.2f} ms")
    print(f"retrieval_p50_ms: {p50:.2f}")


if __name__ == "__main__":
    main()
