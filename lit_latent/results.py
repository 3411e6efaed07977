"""The run folder's records: append-only predictions, resume, summary and the printed table.

``predictions.jsonl`` holds one JSON line per finished problem, appended (one ``write`` per
batch, fsynced) as it completes; a failed write is cut back, so the file holds complete lines
only. A corrupt or partial line (a killed run's, a flipped byte) is skipped by readers and set
aside by ``repair`` into ``predictions.jsonl.corrupt``: every valid record around it is kept,
and the rerun redoes its problem, so every id is written exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from lit_latent.answers import wilson_interval

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
# fields that hold wall-clock figures: they differ between identical runs
TIMING_FIELDS = ("seconds",)


def _scan(path: Path) -> tuple[list[tuple[int, bytes, dict[str, Any]]], list[tuple[int, bytes]]]:
    """Split a predictions file into its records ``(line number, raw line, record)`` and its bad
    lines ``(line number, raw line)``: not UTF-8, not a JSON object, a duplicate id, or a
    partial last line (no newline: a killed run's)."""
    good, bad, seen = [], [], set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = None
            if raw.endswith(b"\n"):
                try:
                    record = json.loads(raw.decode("utf-8"))
                except ValueError:  # JSONDecodeError and UnicodeDecodeError
                    pass
            key = json.dumps(record["id"]) if isinstance(record, dict) and "id" in record else None
            if isinstance(record, dict) and (key is None or key not in seen):
                seen.add(key)
                good.append((lineno, raw, record))
            elif raw.strip():
                bad.append((lineno, raw))
    return good, bad


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All valid records of a predictions file; a corrupt or partial line is skipped, not the
    records after it (``repair`` sets such lines aside)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, _, record in _scan(path)[0]]


def repair(path: str | Path) -> int:
    """Set aside every corrupt or partial line of a predictions file, keeping every valid record
    (before and after it); returns the records kept.

    The bad lines are appended to ``<file>.corrupt``, each prefixed with its line number, before
    the file is rewritten without them (atomically), so nothing on disk is lost. Their problems
    have no record and are redone.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    good, bad = _scan(path)
    if not bad:
        return len(good)
    corrupt = path.with_name(path.name + ".corrupt")
    lines = b"".join(b"line %d: " % lineno + raw.rstrip(b"\n") + b"\n" for lineno, raw in bad)
    _append_bytes(corrupt, lines)
    write_atomic(path, lambda tmp: tmp.write_bytes(b"".join(raw for _, raw, _ in good)))
    where = ", ".join(str(lineno) for lineno, _ in bad)
    print(f"warning: {path}: set aside {len(bad)} corrupt or partial line(s) (line {where}) in {corrupt}; "
          f"kept {len(good)} records; those problems are redone", file=sys.stderr)
    return len(good)


def _append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` with one ``write`` and fsync; on failure (disk full, read-only) cut the
    file back to its old size, so no partial line is left, and say which file in the error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):  # a short write: the device is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and ``os.replace`` onto ``path``: readers see the old or the new file.
    On failure (disk full, read-only) the temporary file is removed and the error names ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def append_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably, as one write of complete lines; keys starting with ``_`` (tensors
    for callbacks) are not written."""
    lines = "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in records)
    if lines:
        _append_bytes(Path(path), lines.encode("utf-8"))


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
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(Path(run_dir) / SUMMARY, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return summary
