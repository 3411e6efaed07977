"""How much faster is a LatentEvolve stream on two devices? One rank against N ranks (DDP).

    python benchmarks/ddp_scaling.py                   # 200 held-out problems, 1 rank then 2 ranks
    python benchmarks/ddp_scaling.py --n 20            # a quick check that it runs
    python benchmarks/ddp_scaling.py --ranks 4 trainer.accelerator=gpu   # on 4 GPUs (the 1-rank run on one)

Both runs are ``configs/latentevolve_anchored.yaml`` on the embedded model's first n held-out
problems, with the same seeds, batch size (per rank) and nights, ``trainer.accelerator=cpu``
unless overridden. The N-rank run is ``trainer.devices=N trainer.strategy=ddp``: each rank takes
every N-th problem, and after every batch the ranks share what they archived, so a problem sees
the memory of the problems finished in earlier batches on any rank; its stream is not the
one-rank stream, and its accuracy may differ by a few problems. On CPU every rank has one
torch thread (one core): the N-rank run uses N times the cores, as it would use N times the
GPUs. Wall time is the whole ``adapt.py`` process, start-up, model loading and nights included.
The run folders (``<out>/ranks-1``, ``<out>/ranks-N``) are made afresh for each measurement.
Last line:

    ddp_scaling: ranks N time_ratio X accuracy_1rank A accuracy_2rank B

(X: the N-rank wall time over the one-rank wall time; A, B: accuracy in %; the name says 2rank
whatever N is, so that scripts read one line format).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from equal_budgets import run_adapt  # noqa: E402

CONFIG = "configs/latentevolve_anchored.yaml"


def timed_run(ranks: int, n: int, overrides: list[str], out: Path) -> tuple[float, dict]:
    """Wall seconds of one fresh run, and its summary."""
    run_dir = out / f"ranks-{ranks}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a resumed run would time only its rest
    devices = [f"trainer.devices={ranks}", "trainer.strategy=ddp"] if ranks > 1 else []
    args = ["--config", CONFIG, f"data.limit={n}", "trainer.accelerator=cpu", *devices, *overrides]
    start = time.perf_counter()
    run_adapt(f"ranks-{ranks}", args, run_dir, out / f"ranks-{ranks}.log")
    seconds = time.perf_counter() - start
    return seconds, json.loads((run_dir / "summary.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="problems: the first n of the held-out file (default 200)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the DDP run (default 2)")
    parser.add_argument("--out", default="runs/ddp_scaling")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs (e.g. trainer.accelerator=gpu)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.ranks < 2:
        raise SystemExit(f"error: --n must be >= 1 and --ranks >= 2, got --n {args.n} --ranks {args.ranks}")
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # one after the other: side by side they would share the cores they are timed on
    one_seconds, one = timed_run(1, args.n, args.overrides, out)
    many_seconds, many = timed_run(args.ranks, args.n, args.overrides, out)
    print("\n| ranks | problems | wall s | s / problem | accuracy % |\n|---|---|---|---|---|")
    for ranks, seconds, summary in ((1, one_seconds, one), (args.ranks, many_seconds, many)):
        print(f"| {ranks} | {summary['n']} | {seconds:.1f} | {seconds / summary['n']:.3f} | {100 * summary['accuracy']:.1f} |")
    print(f"ddp_scaling: ranks {args.ranks} time_ratio {many_seconds / one_seconds:.3f} "
          f"accuracy_1rank {100 * one['accuracy']:.1f} accuracy_2rank {100 * many['accuracy']:.1f}")


if __name__ == "__main__":
    main()
