"""Golden records: the structure's refactors must leave every method's records unchanged.

    python tests/golden/check.py            # run every case, compare with tests/golden/*.jsonl
    python tests/golden/check.py --write    # (re)write the golden files from this code

Each case is ``python adapt.py`` on the embedded model with fixed seeds; records are compared
field by field, timings excepted. ``tests/test_golden.py`` runs the same check (slow marker).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
TIMING = {"seconds"}

CASES = {
    "cot": ["--config", "configs/cot.yaml", "data.limit=40"],
    "latentseek_self": ["--config", "configs/latentseek.yaml", "data.limit=40"],
    "latentseek_verifier": ["--config", "configs/latentseek.yaml", "reward.kind=verifier", "data.limit=40"],
    "latentseek_paper_m4": ["--config", "configs/latentseek_paper.yaml", "latent.samples=4", "latent.rho=0.85",
                            "latent.lr=0.1", "reward.kind=verifier", "generation.max_new_tokens=200",
                            "data.limit=24"],
    "resample": ["--config", "configs/resample.yaml", "data.limit=40"],
    "self_consistency": ["--config", "configs/self_consistency.yaml", "data.limit=12"],
    "best_of_n": ["--config", "configs/best_of_n.yaml", "data.limit=12"],
    "latentevolve": ["--config", "configs/latentevolve.yaml", "data.limit=40", "data.batch_size=10",
                     "evolve.night_every=20"],
    "latentevolve_tuned": ["--config", "configs/latentevolve_tuned.yaml", "data.limit=40", "data.batch_size=10",
                           "evolve.night_every=20"],
}


def run_case(name: str, out: Path) -> list[dict]:
    run_dir = out / name
    cmd = [sys.executable, "adapt.py", *CASES[name], f"run_dir={run_dir}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def differences(name: str, records: list[dict]) -> list[str]:
    golden = [json.loads(line) for line in (GOLDEN / f"{name}.jsonl").read_text().splitlines()]
    if len(golden) != len(records):
        return [f"{name}: {len(records)} records, golden has {len(golden)}"]
    found = []
    for want, got in zip(golden, records):
        want, got = strip(want), strip(got)
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                found.append(f"{name} {want.get('id')}: {key}: golden {str(want.get(key))[:120]!r} now {str(got.get(key))[:120]!r}")
    return found


def main(argv: list[str]) -> int:
    write = "--write" in argv
    names = [a for a in argv if not a.startswith("--")] or list(CASES)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            records = run_case(name, Path(tmp))
            if write:
                (GOLDEN / f"{name}.jsonl").write_text("".join(json.dumps(strip(r)) + "\n" for r in records))
                print(f"{name}: wrote {len(records)} records")
                continue
            diff = differences(name, records)
            print(f"{name}: {'identical' if not diff else f'{len(diff)} differences'} ({len(records)} records)")
            problems += diff
    for line in problems[:40]:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
