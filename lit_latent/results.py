"""The run folder's records: append-only predictions, resume, summary and the printed table.

``predictions.jsonl`` holds one JSON line per finished problem, flushed as it completes. A
killed run can leave a partial last line: readers ignore it and ``repair`` cuts it off, so
the rerun redoes that problem and writes every id exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from lit_latent.answers import wilson_interval

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
# fields that hold wall-clock figures: they differ between identical runs
TIMING_FIELDS = ("seconds",)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a predictions file (a partial last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # partial line of a killed run: redone on resume
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def repair(path: str | Path) -> int:
    """Cut a partial or corrupt tail off a predictions file; returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    good_bytes, kept = 0, 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
            kept += 1
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return kept


def append_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably; keys starting with ``_`` (tensors for callbacks) are not written."""
    lines = "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate figures of a run: accuracy with its 95% interval, compute per problem."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    correct = sum(bool(r.get("correct")) for r in records)
    lo, hi = wilson_interval(correct, n)
    summary: dict[str, Any] = {
        "method": records[0].get("method"),
        "n": n,
        "accuracy": correct / n,
        "accuracy_ci95": [lo, hi],
        "tokens_per_problem": sum(r.get("tokens", 0) for r in records) / n,
        "seconds_per_problem": sum(r.get("seconds", 0.0) for r in records) / n,
    }
    adaptive = [r for r in records if "initial_correct" in r]
    if adaptive:
        summary["initial_accuracy"] = sum(bool(r["initial_correct"]) for r in adaptive) / len(adaptive)
        summary["mean_iterations"] = sum(r.get("iterations", 0) for r in adaptive) / len(adaptive)
        summary["fixed"] = sum(bool(r["correct"]) and not r["initial_correct"] for r in adaptive)
        summary["broken"] = sum(bool(r["initial_correct"]) and not r["correct"] for r in adaptive)
    if any(r.get("reward_uses_labels") for r in records):
        summary["reward_uses_labels"] = True
    statuses = [r.get("status", "ok") for r in records if r.get("status", "ok") != "ok"]
    if statuses:
        summary["statuses"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A short markdown table of a run's summary."""
    if not summary.get("n"):
        return "no problems recorded"
    lo, hi = summary["accuracy_ci95"]
    rows = [("method", str(summary.get("method"))), ("problems", str(summary["n"]))]
    if "initial_accuracy" in summary:
        rows.append(("accuracy before adaptation", f"{100 * summary['initial_accuracy']:.1f}%"))
    rows.append(("accuracy", f"{100 * summary['accuracy']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f})"))
    if "mean_iterations" in summary:
        rows.append(("mean iterations", f"{summary['mean_iterations']:.2f}"))
        rows.append(("fixed / broken", f"{summary['fixed']} / {summary['broken']}"))
    rows.append(("tokens per problem", f"{summary['tokens_per_problem']:.0f}"))
    rows.append(("seconds per problem", f"{summary['seconds_per_problem']:.3f}"))
    if summary.get("reward_uses_labels"):
        rows.append(("note", "reward uses gold labels (verifier)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_summary(run_dir: str | Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarize(records)
    tmp = Path(run_dir) / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(run_dir) / SUMMARY)
    return summary
