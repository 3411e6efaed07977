"""Latent search against resampling at equal budgets, on problems the settings were not tuned on.

    python benchmarks/equal_budgets.py                        # the report split: problems 401-600 and 601-1000
    python benchmarks/equal_budgets.py --split tune           # problems 201-400, where settings are chosen
    python benchmarks/equal_budgets.py --only cot,resample    # some of the runs
    python benchmarks/equal_budgets.py --jobs 2               # two runs at a time (one torch thread each)

Every run but the last two uses the self-reward, stopping rule and answer rule of
``configs/latentseek.yaml`` (the recompute and final checks, stop at 0.8, the best-scored
candidate), on the embedded model's bundled problems:

* ``cot``: the greedy chain of thought.
* ``resample``: the control, a fresh sample at T 0.7 per try (``configs/resample.yaml``).
* ``latentseek_paper_form``: LatentSeek as the paper runs it (candidates decoded from all L
  latents, no regeneration, the last candidate answers) with the tuned rho and lr.
* ``latentseek``: ``configs/latentseek.yaml`` (regenerate after the first changed token).
* ``latentseek_anchored``: ``configs/latentseek_anchored.yaml``.
* ``latentseek_samples8``: ``configs/latentseek.yaml`` with 8 sampled prefixes per step, the
  samples per step of ``configs/latentevolve_tuned.yaml`` (issue 25 compares the stream with it).
* ``latentevolve`` and ``latentevolve_memory_off``: ``configs/latentevolve_tuned.yaml`` as one
  stream from problem 1 to the split's end (the memory needs a past; nights every 200), with the
  memory and without it (``evolve.archive_threshold=2``: nothing is archived, so no neighbours
  and no nights); only the split's problems are reported.
* ``latentevolve_own_edit``: the same stream with ``evolve.archive=own_edit`` (each problem's
  own refinement is archived, not the offsets its start inherited).
* ``latentevolve_anchored``: ``configs/latentevolve_anchored.yaml`` as one stream (the anchored
  search by day, the answer archive and recall); ``latentevolve_anchored_memory_off`` the same
  config with nothing archived, on the split's problems alone (nothing carries over).
* ``latentseek_confidence``: ``configs/latentseek.yaml`` with ``reward.kind=confidence`` (no
  generation, no labels) and no stop threshold (every answer scores over 0.8 on it,
  docs/rewards.md): 10 iterations, the most confident candidate answers.
* ``ltpo``: ``configs/ltpo.yaml``, the paper's code's values; ``ltpo_tuned``: the setting chosen
  on problems 201-400 (docs/equal-budgets.md).

Runs go to ``--out`` (default ``runs/equal_budgets``), one folder each; a folder that exists
resumes (adapt.py writes each problem as it finishes). Then ``python -m lit_latent.report``
writes, per slice of the split, ``<out>/<split>-<first>-<last>/report.md`` with the accuracy table,
the table at equal budgets and ``budgets.png`` (accuracy against tokens and tries per problem).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# split -> the slices reported, (offset, count) in the bundled file
SPLITS = {"tune": [(200, 200)], "report": [(400, 200), (600, 400)]}

SEEK = ["--config", "configs/latentseek.yaml"]
EVOLVE = ["--config", "configs/latentevolve_tuned.yaml"]
RUNS = {
    "cot": ["--config", "configs/cot.yaml"],
    "resample": ["--config", "configs/resample.yaml"],
    "latentseek_paper_form": SEEK + ["latent.regenerate_after_first_change=false", "latent.answer=last"],
    "latentseek": SEEK,
    "latentseek_anchored": ["--config", "configs/latentseek_anchored.yaml"],
    "latentseek_samples8": SEEK + ["latent.samples=8"],
    "latentevolve": EVOLVE,
    "latentevolve_memory_off": EVOLVE + ["evolve.archive_threshold=2"],
    "latentevolve_own_edit": EVOLVE + ["evolve.archive=own_edit"],
    "latentevolve_anchored": ["--config", "configs/latentevolve_anchored.yaml"],
    "latentevolve_anchored_memory_off": ["--config", "configs/latentevolve_anchored.yaml", "evolve.archive_threshold=2"],
    "latentseek_confidence": SEEK + ["reward.kind=confidence", "latent.stop_threshold=null"],
    "ltpo": ["--config", "configs/ltpo.yaml"],
    # chosen on 201-400 (docs/equal-budgets.md): the embedded model reads nothing after the problem well
    "ltpo_tuned": ["--config", "configs/ltpo.yaml", "ltpo.instruction=false", "ltpo.thoughts=1"],
}
# runs with a reward of their own: the confidence (docs/rewards.md), which LTPO's thoughts are tuned for
OWN_REWARD = ("latentseek_confidence", "ltpo", "ltpo_tuned")
# run from problem 1: the memory needs the past (the anchored memory-off run carries nothing from one
# problem to the next, no nights either, so it runs on the split alone)
STREAMS = ("latentevolve", "latentevolve_memory_off", "latentevolve_own_edit", "latentevolve_anchored")


def run(name: str, split: str, out: Path) -> Path:
    slices = SPLITS[split]
    start, end = slices[0][0], slices[-1][0] + slices[-1][1]
    if name in STREAMS:
        run_dir, data = out / f"{name}-stream-1-{end}", ["data.offset=0", f"data.limit={end}"]
    else:
        run_dir, data = out / f"{name}-{start + 1}-{end}", [f"data.offset={start}", f"data.limit={end - start}"]
    return run_adapt(name, [*RUNS[name], *data], run_dir, out / f"{run_dir.name}.log")


def run_adapt(name: str, args: list[str], run_dir: Path, log: Path) -> Path:
    """``python adapt.py ARGS run_dir=RUN_DIR`` in a subprocess with one OpenMP thread (runs go
    side by side with --jobs), its output appended to ``log``; a failed run stops the benchmark."""
    cmd = [sys.executable, "adapt.py", *args, f"run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"{name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit {done.returncode}); see {log}")
    return run_dir


def slice_run(run_dir: Path, first: int, count: int, dest: Path) -> Path:
    """A run folder holding only problems first+1 .. first+count of the bundled file (by position)."""
    from lit_latent.data import read_problems
    from lit_latent.config import HELDOUT_PATH

    ids = {p["id"] for p in read_problems(HELDOUT_PATH, limit=count, offset=first)}
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["id"] in ids]
    if len(kept) != count:
        raise SystemExit(f"error: {run_dir} holds {len(kept)} of the {count} problems {first + 1}-{first + count}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    (dest / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="report")
    parser.add_argument("--out", default="runs/equal_budgets")
    parser.add_argument("--only", help=f"comma-separated runs of: {', '.join(RUNS)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one torch thread)")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in wanted if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: --only: unknown run {', '.join(unknown)} (one of {', '.join(RUNS)})")
    names = [n for n in RUNS if n in wanted]  # the tables' order
    longest_first = sorted(names, key=lambda n: n not in STREAMS)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(longest_first, pool.map(lambda n: run(n, args.split, out), longest_first)))

    sys.path.insert(0, str(ROOT))
    from lit_latent.report import main as report

    for first, count in SPLITS[args.split]:
        where = out / f"{args.split}-{first + 1}-{first + count}"
        sliced = [slice_run(dirs[n], first, count, where / "runs" / n) for n in names]
        print(f"\n## problems {first + 1}-{first + count}\n", flush=True)
        report([*map(str, sliced), "--out", str(where)])


if __name__ == "__main__":
    main()
