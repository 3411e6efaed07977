"""Golden records: every method's answers on the embedded model, kept within a tolerance.

    python tests/golden/check.py                 # tolerance check of every case against tests/golden/*.jsonl
    python tests/golden/check.py --exact         # field-by-field (a refactor on the machine that wrote them)
    python tests/golden/check.py --write [NAME]  # (re)write the golden files from this code

Each case is ``python adapt.py`` on the embedded model with fixed seeds. The tolerance check is
what a user cares about when float rounding moves (another torch or transformers release, a
faster kernel): at least ``MIN_AGREEMENT`` of the final answers are the golden ones, and the
number of correct records differs by at most ``max(1 record, 1 point)``. It prints which
records moved. ``--exact`` compares every field but timings: a refactor must pass it on the
machine and versions that wrote the files. ``tests/test_golden.py`` runs the tolerance check
(slow marker).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
TIMING = {"seconds"}
MIN_AGREEMENT = 0.9

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


def golden_records(name: str) -> list[dict]:
    return [json.loads(line) for line in (GOLDEN / f"{name}.jsonl").read_text().splitlines()]


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def differences(name: str, records: list[dict]) -> list[str]:
    """Every field that differs from the golden file, timings aside (the exact check)."""
    golden = golden_records(name)
    if len(golden) != len(records):
        return [f"{name}: {len(records)} records, golden has {len(golden)}"]
    found = []
    for want, got in zip(golden, records):
        want, got = strip(want), strip(got)
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                found.append(f"{name} {want.get('id')}: {key}: golden {str(want.get(key))[:120]!r} now {str(got.get(key))[:120]!r}")
    return found


@dataclass
class Tolerance:
    """How far a case's answers moved from the golden ones."""

    name: str
    n: int
    same_answers: int
    golden_correct: int
    correct: int
    moved: list[str]  # one line per record whose final answer changed
    problems: list[str]  # why the case fails; empty when it passes

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILS"
        return (f"{self.name}: {verdict}: {self.same_answers}/{self.n} answers as golden "
                f"({100 * self.same_answers / max(self.n, 1):.1f}%), correct {self.correct} vs golden {self.golden_correct}")


def tolerance(name: str, records: list[dict]) -> Tolerance:
    """Answers agreement and accuracy against the golden file, with the records that moved."""
    golden = {r["id"]: r for r in golden_records(name)}
    now = {r["id"]: r for r in records}
    problems = []
    if set(golden) != set(now):
        missing, extra = sorted(set(golden) - set(now)), sorted(set(now) - set(golden))
        problems.append(f"ids differ: missing {missing[:5]}, extra {extra[:5]}")
    common = [i for i in golden if i in now]
    moved = [f"{i}: {golden[i]['final_answer']!r} ({'right' if golden[i]['correct'] else 'wrong'}) -> "
             f"{now[i]['final_answer']!r} ({'right' if now[i]['correct'] else 'wrong'})"
             for i in common if golden[i]["final_answer"] != now[i]["final_answer"]]
    n = len(golden)
    same = len(common) - len(moved)
    golden_correct = sum(bool(golden[i]["correct"]) for i in golden)
    correct = sum(bool(now[i]["correct"]) for i in common)
    if same < MIN_AGREEMENT * n:
        problems.append(f"only {same} of {n} answers as golden (at least {MIN_AGREEMENT:.0%} needed)")
    allowed = max(1, int(0.01 * n))
    if abs(correct - golden_correct) > allowed:
        problems.append(f"{correct} correct against golden {golden_correct} (at most {allowed} apart)")
    return Tolerance(name, n, same, golden_correct, correct, moved, problems)


def main(argv: list[str]) -> int:
    write, exact = "--write" in argv, "--exact" in argv
    names = [a for a in argv if not a.startswith("--")] or list(CASES)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            records = run_case(name, Path(tmp))
            if write:
                (GOLDEN / f"{name}.jsonl").write_text("".join(json.dumps(strip(r)) + "\n" for r in records))
                print(f"{name}: wrote {len(records)} records")
            elif exact:
                diff = differences(name, records)
                print(f"{name}: {'identical' if not diff else f'{len(diff)} differences'} ({len(records)} records)")
                for line in diff[:20]:
                    print("  " + line)
                failed |= bool(diff)
            else:
                result = tolerance(name, records)
                print(result.summary())
                for line in result.problems + [f"moved {m}" for m in result.moved]:
                    print("  " + line)
                failed |= not result.passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
