"""Compare finished runs: a markdown table, a table at equal budgets, and three plots.

    python -m lit_latent.report runs/cot runs/latentseek              # table on stdout; files in runs/cot
    python -m lit_latent.report runs/* --out reports/gsm8k            # report.md, accuracy.png, iterations.png, budgets.png
    python -m lit_latent.report runs/* --token-budgets 200,400,800     # the equal-budget table at these budgets

Each RUN_DIR is an ``adapt.py`` run folder: ``config.yaml`` names the method, reward and data,
``predictions.jsonl`` holds the records. ``aggregate`` and ``by_iteration`` are plain functions
of the records, so the figures can be checked without a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from lit_latent.config import UserError
from lit_latent.results import PREDICTIONS, read_records, summarize
from lit_latent.runs import run_entry_point

# methods whose records carry a reward callback's judgement
REWARD_METHODS = ("latentseek", "resample", "best_of_n", "latentevolve", "ltpo")


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """n, correct, accuracy with its 95% Wilson interval, tokens and seconds per problem;
    for adaptive records also initial accuracy and mean iterations."""
    summary = summarize(list(records))
    summary["correct"] = sum(bool(r.get("correct")) for r in records)
    return summary


def by_iteration(records: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Mean reward and accuracy at iteration 0 (the initial answer) .. K over adaptive records.

    A problem that stopped early keeps its last reward and correctness for later iterations,
    so index K is the final accuracy. Records without ``rewards`` (cot, self-consistency) are
    left out; none adaptive -> ``([], [])``.
    """
    adaptive = [r for r in records if r.get("rewards") and "initial_correct" in r]  # LTPO's rewards score thoughts, not answers
    if not adaptive:
        return [], []
    # per problem: [initial, after candidate 1, ...]
    rewards = [list(r["rewards"]) for r in adaptive]
    correct = [[bool(r["initial_correct"])] + [bool(c["correct"]) for c in r.get("candidates", [])] for r in adaptive]
    depth = max(max(len(x) for x in rewards), max(len(x) for x in correct))
    mean_reward = [sum(x[min(k, len(x) - 1)] for x in rewards) / len(rewards) for k in range(depth)]
    accuracy = [sum(x[min(k, len(x) - 1)] for x in correct) / len(correct) for k in range(depth)]
    return mean_reward, accuracy


def stopping_points(record: dict[str, Any], answer: str = "last", one_by_one: Optional[bool] = None) -> "Points":
    """``(tokens, tries, correct)`` had the run stopped after the initial answer, after its
    first candidate, its second, ...: what a smaller budget would have given.

    Tokens count every generated token (answers and reward generations); tries count the
    answers generated and scored (the initial one included; a candidate that repeats a tried
    prefix is free). ``answer`` is the run's rule: ``last`` (the newest candidate) or ``best``
    (the highest reward so far, earliest on ties). LatentSeek and resample candidates, and those
    of LatentEvolve's greedy day (evolve.samples=1), are decided one by one (``one_by_one``; by
    default all but LatentEvolve's), so a cut is the run that budget would have made; the
    sampled LatentEvolve's answer comes after its whole refinement, so its records give two
    points, the initial answer and the final one. Other methods give one point, their answer at
    their cost.
    """
    candidates = record.get("candidates") or []
    if "initial_correct" not in record:
        return [(record["tokens"], len(record.get("samples") or [None]), bool(record["correct"]))]
    spent = record["tokens"] - sum(c["tokens"] for c in candidates)
    if one_by_one is None:
        one_by_one = record.get("method") != "latentevolve"
    if not one_by_one or len(record["rewards"]) != len(candidates) + 1:
        tries = 1 + sum(c.get("generations", 1) for c in candidates)
        return [(spent, 1, bool(record["initial_correct"])), (record["tokens"], tries, bool(record["correct"]))]
    points = [(spent, 1, bool(record["initial_correct"]))]
    tries, best = 1, (record["rewards"][0], bool(record["initial_correct"]))
    for c in candidates:
        spent += c["tokens"]
        tries += c.get("generations", 1)
        if c["reward"] > best[0]:
            best = (c["reward"], bool(c["correct"]))
        points.append((spent, tries, best[1] if answer == "best" else bool(c["correct"])))
    return points


Points = list[tuple[int, int, bool]]


def under_budget(points: Sequence[Points], budget: float, by: str) -> tuple[float, float]:
    """(accuracy, mean tokens or tries spent per problem) when each problem (its
    ``stopping_points``) may spend at most ``budget`` (``by``: "tokens" or "tries"); a problem
    whose initial answer already costs more has no answer (wrong) and spends nothing."""
    axis = 0 if by == "tokens" else 1
    correct, spent = 0, 0
    for problem in points:
        within = [p for p in problem if p[axis] <= budget]
        if within:
            correct += within[-1][2]
            spent += within[-1][axis]
    return correct / len(points), spent / len(points)


# --- reading runs ------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's settings and records; a folder that is not a run is a UserError naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    predictions = run_dir / PREDICTIONS
    if not predictions.is_file():
        raise UserError(f"{run_dir}: no {PREDICTIONS} (not a run folder of adapt.py?)")
    records = read_records(predictions)
    if not records:
        raise UserError(f"{predictions}: holds no finished problems")
    config = _read_config(run_dir / "config.yaml")
    method = config.get("method") or records[0].get("method") or "?"
    reward = (config.get("reward") or {}).get("kind") if method in REWARD_METHODS else None
    if reward and any(r.get("reward_uses_labels") for r in records):
        reward += " (gold labels)"
    data_path = (config.get("data") or {}).get("path")
    # the answer rule decides what a cut run would have answered (the schema's default: last)
    answer = (config.get("latent") or {}).get("answer", "last") if method in ("latentseek", "resample") else "last"
    evolve = config.get("evolve") or {}
    greedy_day = method == "latentevolve" and evolve.get("samples") == 1  # LatentSeek's iteration by day
    if greedy_day:
        answer = evolve.get("answer", "last")
    return {
        # each problem's, for the equal-budget figures
        "points": [stopping_points(r, answer, one_by_one=True if greedy_day else None) for r in records],
        "dir": run_dir,
        "method": method,
        "data": Path(data_path).stem if data_path else "?",
        "reward": reward or "-",
        "records": records,
    }


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}  # an old or hand-made run: method comes from the records
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise UserError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: must hold a mapping of config keys")
    return loaded


def run_labels(dirs: Sequence[Path]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [d.name or str(d) for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


# --- table ---------------------------------------------------------------------------------------

COLUMNS = ["run", "method", "data", "reward", "n", "accuracy % (95% CI)", "initial %", "iterations", "tokens / problem", "s / problem"]


def table_row(label: str, run: dict[str, Any], agg: dict[str, Any]) -> list[str]:
    lo, hi = agg["accuracy_ci95"]
    return [
        label,
        run["method"],
        run["data"],
        run["reward"],
        str(agg["n"]),
        f"{100 * agg['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})",
        f"{100 * agg['initial_accuracy']:.1f}" if "initial_accuracy" in agg else "-",
        f"{agg['mean_iterations']:.2f}" if "mean_iterations" in agg else "-",
        f"{agg['tokens_per_problem']:.0f}",
        f"{agg['seconds_per_problem']:.2f}",
    ]


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    return markdown(COLUMNS, rows)


# --- equal budgets ---------------------------------------------------------------------------


def token_budgets(runs: Sequence[dict[str, Any]], count: int = 5) -> list[int]:
    """``count`` per-problem token budgets, spaced by ratio, from the median cost of a first
    answer (over every run's problems) to the largest 90th percentile of a run's full spend,
    rounded to two significant digits."""
    first = sorted(p[0][0] for run in runs for p in run["points"])
    lo = max(1, first[len(first) // 2])
    spends = [sorted(p[-1][0] for p in run["points"]) for run in runs]
    hi = max(lo + 1, *(s[min(len(s) - 1, int(0.9 * len(s)))] for s in spends))
    raw = [lo * (hi / lo) ** (k / (count - 1)) for k in range(count)]
    return sorted({int(float(f"{b:.2g}")) for b in raw})


def budget_rows(labels: Sequence[str], runs: Sequence[dict[str, Any]], tokens: Sequence[int], tries: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """Accuracy (%) of each run when each problem may spend at most B tokens, or N tries."""
    header = ["run"] + [f"<= {b} tokens" for b in tokens] + [f"<= {n} tries" for n in tries]
    rows = []
    for label, run in zip(labels, runs):
        cells = [f"{100 * under_budget(run['points'], b, 'tokens')[0]:.1f}" for b in tokens]
        cells += [f"{100 * under_budget(run['points'], n, 'tries')[0]:.1f}" for n in tries]
        rows.append([label] + cells)
    return header, rows


def budget_curve(points: Sequence[Points], by: str) -> tuple[list[float], list[float]]:
    """(mean spent per problem, accuracy) at every budget where some problem's answer changes."""
    axis = 0 if by == "tokens" else 1
    budgets = sorted({p[axis] for problem in points for p in problem})
    curve = [under_budget(points, b, by) for b in budgets]
    return [spent for _, spent in curve], [100 * acc for acc, _ in curve]


def plot_budgets(path: Path, labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for label, run in zip(labels, runs):
        for ax, by in ((ax_t, "tokens"), (ax_n, "tries")):
            xs, ys = budget_curve(run["points"], by)
            ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, markersize=4, drawstyle="steps-post", label=label)
    first = sorted(p[0][0] for run in runs for p in run["points"])
    ax_t.set_xlim(left=max(1.0, 0.3 * first[len(first) // 2]))  # below that hardly any first answer fits
    ax_t.set_xlabel("generated tokens per problem (answers and rewards), mean")
    ax_n.set_xlabel("answers generated and scored per problem, mean")
    for ax, title in ((ax_t, "Accuracy at equal tokens"), (ax_n, "Accuracy at equal tries")):
        ax.set_title(title)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.5, 0.0, "Each point: every problem may spend at most B; a run stops where its next candidate would pass B.",
             ha="center", va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{c:{w}}" for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


# --- plots ---------------------------------------------------------------------------------------


def plot_accuracy(path: Path, labels: Sequence[str], aggs: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100 * a["accuracy"] for a in aggs]
    err = [[100 * (a["accuracy"] - a["accuracy_ci95"][0]) for a in aggs], [100 * (a["accuracy_ci95"][1] - a["accuracy"]) for a in aggs]]
    xs = range(len(aggs))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(aggs) + 1.5), 4.0))
    ax.bar(xs, acc, yerr=err, capsize=5, color="tab:blue", alpha=0.8, label="accuracy (95% CI)")
    initial = [(x, 100 * a["initial_accuracy"]) for x, a in zip(xs, aggs) if "initial_accuracy" in a]
    if initial:
        ax.scatter([x for x, _ in initial], [y for _, y in initial], marker="_", s=900, linewidths=3, color="tab:orange", zorder=3, label="before adaptation")
    for x, y in zip(xs, acc):
        ax.annotate(f"{y:.1f}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: bars may reach 100
    ax.set_title("Accuracy by run")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_iterations(path: Path, curves: Sequence[tuple[str, list[float], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for label, reward, accuracy in curves:
        ax_r.plot(range(len(reward)), reward, marker="o", label=label)
        ax_a.plot(range(len(accuracy)), [100 * a for a in accuracy], marker="o", label=label)
    ax_r.set_title("Mean reward by iteration")
    ax_r.set_ylabel("mean reward")
    ax_r.set_ylim(-0.02, 1.02)
    ax_a.set_title("Accuracy by iteration")
    ax_a.set_ylabel("accuracy (%)")
    ax_a.set_ylim(-2, 102)
    for ax in (ax_r, ax_a):
        ax.set_xlabel("iteration (0 = initial answer)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.5, 0.0, "A problem that stopped early keeps its last reward and answer.", ha="center", va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- entry point ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_latent.report", description="Compare adapt.py runs: markdown tables, accuracy.png, iterations.png, budgets.png.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by adapt.py")
    parser.add_argument("--out", help="where report.md and the plots go (default: the first RUN_DIR)")
    parser.add_argument("--token-budgets", type=budget_list, metavar="B,B,...",
                        help="per-problem token budgets of the equal-budget table (default: 5 from the runs' spread)")
    parser.add_argument("--try-budgets", type=budget_list, default=[1, 2, 3, 6, 11], metavar="N,N,...",
                        help="per-problem tries of the equal-budget table (default: 1,2,3,6,11)")
    return parser.parse_args(argv)


def budget_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be > 0, got {text!r}")
    return values


def main(argv: list[str]) -> str:
    args = parse_args(argv)
    runs = [load_run(d) for d in args.run_dirs]  # every folder checked before anything is written
    out = Path(args.out) if args.out else runs[0]["dir"]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    labels = run_labels([r["dir"] for r in runs])
    aggs = [aggregate(r["records"]) for r in runs]
    table = markdown_table([table_row(label, run, agg) for label, run, agg in zip(labels, runs, aggs)])
    print(table)

    note = "initial %: accuracy of the first answer, before adaptation. A reward marked (gold labels) is an oracle."
    report = f"# Runs compared\n\n{table}\n\n{note}\n\n![accuracy](accuracy.png)\n"
    plot_accuracy(out / "accuracy.png", labels, aggs)
    written = ["accuracy.png"]

    curves = [(label, *by_iteration(run["records"])) for label, run in zip(labels, runs)]
    curves = [c for c in curves if c[1]]
    if curves:
        plot_iterations(out / "iterations.png", curves)
        report += "\n![reward and accuracy by iteration](iterations.png)\n"
        written.append("iterations.png")
    else:
        (out / "iterations.png").unlink(missing_ok=True)  # a stale plot would belong to other runs
        print("no adaptive run (latentseek, resample): no iterations.png")

    header, rows = budget_rows(labels, runs, args.token_budgets or token_budgets(runs), args.try_budgets)
    budgets = markdown(header, rows)
    print(f"\naccuracy % when each problem may spend at most B generated tokens, or N answers generated and scored:\n{budgets}")
    plot_budgets(out / "budgets.png", labels, runs)
    written.append("budgets.png")
    report += (f"\n## At equal budgets\n\nAccuracy (%) when each problem may spend at most B generated tokens (answers and "
               f"reward generations), or N tries (answers generated and scored, the initial one included); a run is cut "
               f"where its next candidate would pass the budget and answers by its own rule.\n\n{budgets}\n\n"
               f"![accuracy at equal tokens and tries](budgets.png)\n")
    (out / "report.md").write_text(report, encoding="utf-8")
    written.insert(0, "report.md")
    print(f"wrote {', '.join(written)} in {out}")
    return table


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
