"""Speed and accuracy against the ORIGINAL LatentSeek code, on the same problems and settings.

    python benchmarks/vs_upstream.py                                # embedded model, 20 problems, verifier reward
    python benchmarks/vs_upstream.py --reward both --n-self 5       # + the self reward at the same verdict budget
    python benchmarks/vs_upstream.py --size qwen05b                 # Qwen2-0.5B's shape, random weights (built locally)

Upstream runs through the shared harness (``../shared/ref/latentseek/run_ref.py``, bigai-nlco/LatentSeek
@ 9f42eab, see its README and PATCHES.md) in a subprocess; ours is ``python adapt.py`` in another,
with the paper's answer rule (``configs/latentseek_paper.yaml``: no regeneration, last candidate).

Settings (issue 26): ``--prompt-style project`` (the same user message), rho 0.85, lr 0.1, 10 steps,
threshold -0.2 (ours 0.8 on [0, 1]), 200 new tokens. The rewards:

* verifier: upstream ``--reward oracle`` (0 / -1 by math_verify against the gold answer) == our
  ``reward.kind=verifier`` (1 / 0). Same answers, same iterations: the comparison is like for like.
* self: upstream ``--reward self`` (its ``RewardModel``: 4 verifier prompts per reward, each its own
  ``generate``) against our ``reward.kind=self reward.scheme=latentseek`` (the same 4 checks, ours
  worded for the embedded model). The verification budget is the same on both sides:
  ``--vera-max-new-tokens`` (default 4) == our ``reward.verdict_tokens``. Upstream's own 4096-token
  budget is far slower still (``--vera-max-new-tokens 4096``). The two rewards read different prompts,
  so their accuracies are not expected to agree; only the speed is like for like.

Timing, like for like: upstream's per-problem ``wall_s`` (initial CoT + the LatentSeek loop with its
rewards; model load and the final judging excluded), summed, against the sum of our records'
``seconds`` (the whole ``predict_step``: prompt encoding, CoT, loop, rewards and the judging of every
candidate; model load and Lightning start-up excluded). Both sides run with the same torch thread count
(``--threads``, default 1): on a shared 2-core machine two threads per process oversubscribe the cores,
and OpenMP's spin-waiting then slows both sides 10-25x (measured: ours 6.2 s at 1 thread vs 155 s at
2 while other jobs ran), which says nothing about either implementation.

``--size qwen05b``: a random-weight model with Qwen2-0.5B's transformer (hidden 896, 24 layers, 14 heads,
2 KV heads, MLP 4864, tied embeddings), built locally (no download) once into ``--cache-dir``, with the
embedded model's tokenizer (vocab 800, so its lm_head is 800 x 896 instead of 151936 x 896). It never
answers right, so every problem runs all its steps; few problems and short answers keep it to minutes.
Upstream generates ``T + 1`` tokens for ``--max-new-tokens T`` (its counter is checked after the
increment), so ours gets ``T + 1`` too where the cap binds (the random model), to do the same work.

Last line(s): ``vs_upstream: <upstream s / ours s>x accuracy_delta: <ours - upstream, points>`` per
reward (the verifier's last).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "ref" / "latentseek" / "run_ref.py"
EMBEDDED = ROOT / "lit_latent" / "embedded" / "model"
HELDOUT = ROOT / "lit_latent" / "embedded" / "heldout.jsonl"

# Qwen2-0.5B(-Instruct)'s config.json, but the vocabulary (the embedded tokenizer's)
QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=True, hidden_act="silu")


def build_qwen05b(out: Path) -> Path:
    """Random weights in Qwen2-0.5B's shape, the embedded tokenizer; built once, then reused."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(EMBEDDED, local_files_only=True)
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **QWEN05B)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name in ("generation_config.json",):
        shutil.copy(EMBEDDED / name, tmp / name)
    tmp.rename(out)
    return out


def run(cmd: list[str], threads: int, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  see {log}:\n" + log.read_text()[-2000:])


def upstream(args, model: Path, reward: str, n: int, max_new: int, out: Path) -> dict:
    cmd = [sys.executable, str(REF), "--model", str(model), "--data", str(args.data), "--n", str(n),
           "--reward", "oracle" if reward == "verifier" else "self", "--prompt-style", "project",
           "--k", str(args.rho), "--lr", str(args.lr), "--max-num-steps", str(args.steps),
           "--reward-threshold", "-0.2", "--max-new-tokens", str(max_new), "--threads", str(args.threads),
           "--out", str(out / "ref.json")]
    if reward == "self":
        cmd += ["--vera-max-new-tokens", str(args.vera_max_new_tokens)]
    run(cmd, args.threads, out / "ref.out")
    data = json.loads((out / "ref.json").read_text())
    per = data["per_problem"]
    return {"seconds": sum(p["wall_s"] for p in per), "accuracy": sum(p["correct_after"] for p in per) / len(per),
            "accuracy_before": sum(p["correct_before"] for p in per) / len(per),
            "iterations": sum(p["iterations"] for p in per) / len(per), "n": len(per),
            "answers": [p["final_extracted"] for p in per]}


def ours(args, model: Path, reward: str, n: int, max_new: int, out: Path) -> dict:
    run_dir = out / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "adapt.py", "--config", "configs/latentseek_paper.yaml", f"model.path={model}",
           f"data.path={args.data}", f"data.limit={n}", f"latent.rho={args.rho}", f"latent.lr={args.lr}",
           f"latent.max_iterations={args.steps}", "latent.stop_threshold=0.8", f"generation.max_new_tokens={max_new}",
           f"reward.kind={reward}", f"run_dir={run_dir}", "trainer.accelerator=cpu"]
    if reward == "self":
        cmd += ["reward.scheme=latentseek", f"reward.verdict_tokens={args.vera_max_new_tokens}"]
    run(cmd + args.ours, args.threads, out / "ours.out")
    recs = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {"seconds": sum(r["seconds"] for r in recs), "accuracy": sum(r["correct"] for r in recs) / len(recs),
            "accuracy_before": sum(r["initial_correct"] for r in recs) / len(recs),
            "iterations": sum(r["iterations"] for r in recs) / len(recs), "n": len(recs),
            "answers": [r["final_answer"] for r in recs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["embedded", "qwen05b"], default="embedded")
    ap.add_argument("--reward", choices=["verifier", "self", "both"], default="verifier")
    ap.add_argument("--n", type=int, default=None, help="problems for the verifier reward (embedded 20, qwen05b 2)")
    ap.add_argument("--n-self", type=int, default=None, help="problems for the self reward (embedded 5, qwen05b 1): upstream's is slow")
    ap.add_argument("--data", default=str(HELDOUT))
    ap.add_argument("--max-new-tokens", type=int, default=None, help="upstream's T (embedded 200, qwen05b 8)")
    ap.add_argument("--steps", type=int, default=None, help="LatentSeek iterations (embedded 10, qwen05b 2)")
    ap.add_argument("--rho", type=float, default=0.85)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--vera-max-new-tokens", type=int, default=4, help="self reward: tokens per verification, both sides")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each side (the same for both)")
    ap.add_argument("--repeats", type=int, default=1, help="run both sides this many times, interleaved; the fastest counts")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lit_latent_bench"))
    ap.add_argument("--keep", default=None, help="keep the runs' outputs here (default: a temp dir, removed)")
    ap.add_argument("ours", nargs="*", help="extra key=value overrides for our side, e.g. data.batch_size=20")
    args = ap.parse_args()

    big = args.size == "qwen05b"
    model = build_qwen05b(Path(args.cache_dir) / "qwen2-0.5b-shape-random") if big else EMBEDDED
    args.steps = args.steps or (2 if big else 10)
    max_new = args.max_new_tokens or (8 if big else 200)
    ours_new = max_new + 1 if big else max_new  # the random model never stops early: match upstream's T + 1
    rewards = ["self", "verifier"] if args.reward == "both" else [args.reward]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vs_upstream_"))
    lines = []
    print(f"model: {model} ({args.size}), threads {args.threads}, rho {args.rho}, lr {args.lr}, steps {args.steps}, "
          f"max new tokens {max_new} (ours {ours_new})")
    print("| reward | n | side | seconds | s/problem | accuracy before -> after | mean iterations |")
    print("|---|---|---|---|---|---|---|")
    for reward in rewards:
        n = (args.n if reward == "verifier" else args.n_self) or {("verifier", False): 20, ("self", False): 5,
                                                                  ("verifier", True): 2, ("self", True): 1}[reward, big]
        best = {}
        for rep in range(args.repeats):
            for side, fn in (("upstream", upstream), ("ours", ours)):
                out = work / f"{reward}-{side}-{rep}"
                out.mkdir(parents=True, exist_ok=True)
                r = fn(args, model, reward, n, max_new if side == "upstream" else ours_new, out)
                if side not in best or r["seconds"] < best[side]["seconds"]:
                    best[side] = r
        up, me = best["upstream"], best["ours"]
        for side, r in (("upstream", up), ("ours", me)):
            print(f"| {reward} | {r['n']} | {side} | {r['seconds']:.2f} | {r['seconds'] / r['n']:.3f} | "
                  f"{100 * r['accuracy_before']:.0f}% -> {100 * r['accuracy']:.0f}% | {r['iterations']:.2f} |")
        same = sum(a == b for a, b in zip(up["answers"], me["answers"]))
        lines.append(f"vs_upstream: {up['seconds'] / me['seconds']:.1f}x accuracy_delta: {100 * (me['accuracy'] - up['accuracy']):+.1f}"
                     f"  (reward={reward}, size={args.size}, n={n}, same final answers {same}/{n})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
