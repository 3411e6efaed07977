"""The CUDA path in one short run: problems/s, decode tokens/s against ``model.generate``, peak memory.

    python benchmarks/gpu_check.py                          # on a lent GPU: embedded model + Qwen2-0.5B shape, bf16
    python benchmarks/gpu_check.py --device cpu --n 4 --max-new-tokens 32 --models embedded   # the CPU smoke run

For each model: (1) our batched greedy decode (``lit_latent.generation.generate``) and
transformers' ``model.generate`` (greedy, its own cache) on the same left-padded batch of
``--n`` prompts: tokens/s of each (one warm-up run first, then the best of ``--repeats``),
their ratio, and how many rows decode to the same tokens; (2) ``adapt.py`` with
``configs/latentseek.yaml`` and the verifier reward on the same ``--n`` problems, in this
process: problems/s from the records' seconds (model load and Lightning start-up excluded);
(3) peak CUDA memory over both (on a CPU: the process's peak resident memory, said so).

The 0.5B shape is random weights in Qwen2-0.5B's transformer with the embedded tokenizer
(``benchmarks/vs_upstream.py --size qwen05b`` builds the same model), so it never answers
right and LatentSeek runs every iteration. Built once into ``--cache-dir``.

On an H100/H200 the default run takes about a minute or two, well under five. Last line:
``gpu_check: <model> problems_per_s X decode_ratio Y peak_gib Z`` per model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from lit_latent.config import AdaptConfig, ModelConfig  # noqa: E402
from lit_latent.data import read_problems  # noqa: E402
from lit_latent.engine import Engine  # noqa: E402
from lit_latent.generation import generate, load_model  # noqa: E402
from lit_latent.kvcache import _left_pad  # noqa: E402

EMBEDDED = ROOT / "lit_latent" / "embedded" / "model"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels load, caches fill
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def until_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], int]:
    """A generated row before its first EOS, and how many tokens were generated (the EOS included)."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i], i + 1
    return row, len(row)


def decode_speed(model, engine: Engine, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """Tokens/s of our decode and of ``model.generate`` on the same batch, and how many rows agree."""
    device = engine.device
    ours = {}

    def run_ours():
        ours["out"] = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=engine.eos_ids, pad_id=engine.pad_id)

    ids, mask = _left_pad(prompts, engine.pad_id, device)
    theirs = {}

    def run_theirs():
        theirs["out"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=engine.pad_id, eos_token_id=engine.eos_ids)

    with torch.no_grad():
        ours_s = best_seconds(run_ours, device, repeats)
        theirs_s = best_seconds(run_theirs, device, repeats)
    eos = set(engine.eos_ids)
    their_rows = [until_eos(row, eos) for row in theirs["out"][:, ids.shape[1]:].tolist()]
    same = sum(ours_row == theirs_row for ours_row, (theirs_row, _) in zip(ours["out"].tokens, their_rows))
    our_tokens, their_tokens = sum(ours["out"].new_tokens), sum(n for _, n in their_rows)
    return {"ours_tokens_per_s": our_tokens / ours_s, "generate_tokens_per_s": their_tokens / theirs_s,
            "ratio": (our_tokens / ours_s) / (their_tokens / theirs_s), "same_rows": same, "rows": len(prompts),
            "ours_tokens": our_tokens, "generate_tokens": their_tokens}


def adapt_speed(model_path: Path, n: int, device: torch.device, dtype: str, max_new_tokens: int) -> dict:
    """``adapt.py`` (LatentSeek, verifier reward) on n problems in this process: problems/s from the records."""
    import adapt

    with tempfile.TemporaryDirectory() as tmp:
        adapt.main(["--config", str(ROOT / "configs" / "latentseek.yaml"), "reward.kind=verifier",
                    f"data.limit={n}", f"data.batch_size={n}", f"model.path={model_path}", f"model.dtype={dtype}",
                    f"generation.max_new_tokens={max_new_tokens}", f"run_dir={Path(tmp) / 'run'}",
                    f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.devices=1"])
        records = [json.loads(line) for line in (Path(tmp) / "run" / "predictions.jsonl").read_text().splitlines()]
    if len(records) != n:
        raise SystemExit(f"gpu_check: adapt.py recorded {len(records)} of {n} problems; no figure from an incomplete run")
    seconds = sum(r["seconds"] for r in records)
    return {"problems_per_s": n / seconds, "accuracy": sum(r["correct"] for r in records) / n,
            "iterations": sum(r.get("iterations", 0) for r in records) / n}


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "peak CUDA memory allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak resident memory of the process (no CUDA)"


def check_model(name: str, path: Path, args, device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = AdaptConfig()
    cfg.model = ModelConfig(path=str(path), dtype=args.dtype)
    model, tokenizer = load_model(cfg.model)
    model.to(device)
    engine = Engine(model, tokenizer, cfg)
    problems = read_problems(cfg.data.path, args.n)
    speed = decode_speed(model, engine, engine.encode(problems), args.max_new_tokens, args.repeats)
    del model, engine
    adapted = adapt_speed(path, args.n, device, args.dtype, args.max_new_tokens)
    peak, what = peak_memory_gib(device)
    print(f"{name}: decode of {speed['rows']} rows x {args.max_new_tokens} new tokens: ours {speed['ours_tokens_per_s']:.0f} tok/s "
          f"({speed['ours_tokens']} tokens), model.generate {speed['generate_tokens_per_s']:.0f} tok/s "
          f"({speed['generate_tokens']} tokens): {speed['ratio']:.2f}x; rows decoded alike {speed['same_rows']}/{speed['rows']}")
    print(f"{name}: LatentSeek (configs/latentseek.yaml, verifier) on {args.n} problems: {adapted['problems_per_s']:.2f} problems/s, "
          f"accuracy {100 * adapted['accuracy']:.1f}%, {adapted['iterations']:.1f} iterations/problem")
    print(f"{name}: {what}: {peak:.2f} GiB")
    return f"gpu_check: {name} problems_per_s {adapted['problems_per_s']:.3f} decode_ratio {speed['ratio']:.2f} peak_gib {peak:.2f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model.dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--n", type=int, default=32, help="problems (= decode rows) per model")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs after the warm-up; the best counts")
    parser.add_argument("--models", default="embedded,qwen05b", help="comma-separated: embedded, qwen05b")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lit_latent_bench"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for the smoke run)")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: device {device} ({name}), dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    paths = {"embedded": EMBEDDED}
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - {"embedded", "qwen05b"})
    if unknown:
        raise SystemExit(f"gpu_check: unknown --models entry {unknown[0]!r} (choose from embedded, qwen05b)")
    if "qwen05b" in wanted:
        from vs_upstream import build_qwen05b

        paths["qwen05b"] = build_qwen05b(Path(args.cache_dir) / "qwen2-0.5b-shape-random")
    last_lines = [check_model(m, paths[m], args, device) for m in wanted]
    print("\n".join(last_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
