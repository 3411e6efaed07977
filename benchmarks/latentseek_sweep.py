"""The sweep behind configs/latentseek.yaml, and the comparison table of issue-level targets.

    python benchmarks/latentseek_sweep.py --reward verifier --problems 200   # grid with the gold-label reward
    python benchmarks/latentseek_sweep.py --reward self --grid table          # the README's comparison rows

Each run is an ordinary ``adapt.py`` run in ``<out>/<name>`` (resumable); at the end
``lit_latent.report`` prints and plots them all together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adapt  # noqa: E402
from lit_latent import report  # noqa: E402

# name -> (config file, overrides)
GRIDS = {
    "lr_rho": {
        f"ls-rho{rho}-lr{lr}": ("latentseek.yaml", [f"latent.rho={rho}", f"latent.lr={lr}"])
        for rho in (0.2, 0.5, 0.85)
        for lr in (0.03, 0.1, 0.3)
    },
    "table": {
        "cot": ("cot.yaml", []),
        "resample": ("resample.yaml", []),
        "latentseek-paper": ("latentseek_paper.yaml", ["generation.max_new_tokens=200"]),
        "latentseek": ("latentseek.yaml", []),
        "latentseek-regen": ("latentseek.yaml", ["latent.regenerate_after_first_change=true"]),
        "latentseek-m4": ("latentseek.yaml", ["latent.samples=4", "latent.sample_temperature=1.0"]),
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reward", default="verifier", help="reward.kind of every adaptive run")
    ap.add_argument("--scheme", default="steps", help="reward.scheme when --reward self")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--grid", default="table", choices=sorted(GRIDS))
    ap.add_argument("--only", nargs="*", help="run only these names of the grid")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_args()
    dirs = []
    for name, (config, overrides) in GRIDS[args.grid].items():
        if args.only and name not in args.only:
            continue
        reward = f"{args.reward}-{args.scheme}" if args.reward == "self" else args.reward
        run_dir = Path(args.out) / f"{reward}-{name}" if name != "cot" else Path(args.out) / "cot"
        argv = ["--config", str(ROOT / "configs" / config), f"data.limit={args.problems}", f"run_dir={run_dir}",
                f"reward.kind={args.reward}", f"reward.scheme={args.scheme}", *overrides, *args.overrides]
        print(f"== {name}: {' '.join(argv[2:])}", flush=True)
        adapt.main(argv)
        dirs.append(str(run_dir))
    report.main(dirs + ["--out", args.out])


if __name__ == "__main__":
    main()
