"""Does LatentEvolve's memory recall a problem it has met before? Memory on against memory off.

    python benchmarks/memory_recall.py                 # 400 problems: held-out 1-200, then again
    python benchmarks/memory_recall.py --n 40          # smaller: 1-20, then again
    python benchmarks/memory_recall.py --jobs 2        # both runs at once (one torch thread each)

The stream (``<out>/stream.jsonl``) is the held-out file's first n/2 problems, then the same
problems again under new ids: the even ones of them verbatim (``<id>-again``), the odd ones
reworded (``<id>-reworded``) with the same numbers by this rule: every person's name becomes the
next name of the embedded generator's list with the same pronoun, and every object, item, place
and product noun the next one of its list (``lit_latent/embedded/problems.py``), so the numbers,
the order of the sentences and the worked solution stay as they were.

Both runs use ``configs/latentevolve_anchored.yaml`` (the anchored day search, ``evolve.archive=
answer``, ``evolve.recall``), the same seeds and the same problems. Memory on runs the whole
stream. Memory off (``evolve.archive_threshold=2``: nothing is archived, so no neighbours, no
recall and no nights) carries nothing from one problem to the next, so it runs only the second
occurrences. Reported on the second occurrences, verbatim and reworded apart: tries (answers
generated and scored, the initial one included) and tokens per problem, accuracy. Last line:

    memory_recall: verbatim_tries_ratio X reworded_tries_ratio Y accuracy_delta Z

(ratios: memory on / memory off; Z: accuracy on - off over all second occurrences, in points).
A run folder that exists resumes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lit_latent.config import HELDOUT_PATH  # noqa: E402
from lit_latent.data import read_problems  # noqa: E402
from lit_latent.embedded.problems import ITEMS, NAMES, OBJECTS, PLACES, numbers_in  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from equal_budgets import run_adapt  # noqa: E402

CONFIG = "configs/latentevolve_anchored.yaml"


def _next_of(words: list[str]) -> dict[str, str]:
    return {w: words[(k + 1) % len(words)] for k, w in enumerate(words)}


def _swaps() -> dict[str, str]:
    swaps = {}
    for pronoun in ("he", "she"):  # a name becomes the next one with the same pronoun
        swaps.update(_next_of([name for name, pr, _ in NAMES if pr == pronoun]))
    for words in (OBJECTS, ITEMS, [p for p, _, _ in PLACES], [o for _, _, o in PLACES]):
        swaps.update(_next_of(list(words)))
    return swaps


SWAPS = _swaps()
_WORDS = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SWAPS), key=len, reverse=True)) + r")\b")


def reword(text: str) -> str:
    """The problem with its names and nouns swapped (the rule above); numbers unchanged."""
    return _WORDS.sub(lambda m: SWAPS[m.group(1)], text)


def build_stream(n: int) -> list[dict]:
    """Held-out problems 1..n/2, then each again: even positions verbatim, odd ones reworded."""
    if n < 2 or n % 2:
        raise SystemExit(f"error: --n must be an even number >= 2, got {n}")
    first = read_problems(HELDOUT_PATH, limit=n // 2)
    again = []
    for k, p in enumerate(first):
        if k % 2 == 0:
            again.append(dict(p, id=f"{p['id']}-again"))
        else:
            text = reword(p["problem"])
            if numbers_in(text) != numbers_in(p["problem"]) or text == p["problem"]:
                raise SystemExit(f"error: the rewording rule failed on {p['id']}")
            again.append(dict(p, id=f"{p['id']}-reworded", problem=text))
    return first + again


def run(name: str, args: list[str], out: Path) -> Path:
    return run_adapt(name, ["--config", CONFIG, *args], out / name, out / f"{name}.log")


def second_occurrences(run_dir: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in records if r["id"].endswith(("-again", "-reworded"))}


def measure(records: list[dict]) -> dict[str, float]:
    """Per problem: tries (1 + answers generated for candidates), tokens; accuracy (%)."""
    n = len(records)
    return {"n": n, "tries": sum(1 + r.get("generations", 0) for r in records) / n,
            "tokens": sum(r["tokens"] for r in records) / n, "accuracy": 100 * sum(bool(r["correct"]) for r in records) / n}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="stream length: n/2 problems, then each again (default 400)")
    parser.add_argument("--out", default="runs/memory_recall")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one torch thread)")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs (e.g. evolve.max_steps=2)")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = out / "stream.jsonl"
    stream.write_text("".join(json.dumps(p) + "\n" for p in build_stream(args.n)))
    half = args.n // 2
    # batches that divide n/2: no batch mixes the two halves, and memory off sees the same batches
    batch = max(b for b in range(1, 33) if half % b == 0)
    runs = {
        "memory_on": [f"data.path={stream}", "data.offset=0", f"data.limit={args.n}", f"data.batch_size={batch}", *args.overrides],
        "memory_off": [f"data.path={stream}", f"data.offset={half}", f"data.limit={half}", f"data.batch_size={batch}",
                       "evolve.archive_threshold=2", *args.overrides],
    }
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(runs, pool.map(lambda name: run(name, runs[name], out), runs)))

    print("\n".join(summary(dirs["memory_on"], dirs["memory_off"], half)))


def summary(on_dir: Path, off_dir: Path, half: int) -> list[str]:
    """The table of the second occurrences, memory off and on, and the last line."""
    on, off = second_occurrences(on_dir), second_occurrences(off_dir)
    if sorted(on) != sorted(off) or len(on) != half:
        raise SystemExit(f"error: the runs hold {len(on)} and {len(off)} of the {half} second occurrences")
    lines = ["", "| second occurrences | n | memory | tries / problem | tokens / problem | accuracy % | recalled |",
             "|---|---|---|---|---|---|---|"]
    ratios = {}
    for kind, suffix in (("verbatim", "-again"), ("reworded", "-reworded"), ("all", "")):
        ids = [i for i in on if i.endswith(suffix)]
        m_on, m_off = measure([on[i] for i in ids]), measure([off[i] for i in ids])
        recalled = sum("recalled" in on[i] for i in ids)
        lines.append(f"| {kind} | {len(ids)} | off | {m_off['tries']:.2f} | {m_off['tokens']:.0f} | {m_off['accuracy']:.1f} | |")
        lines.append(f"| {kind} | {len(ids)} | on | {m_on['tries']:.2f} | {m_on['tokens']:.0f} | {m_on['accuracy']:.1f} | {recalled} |")
        ratios[kind] = (m_on["tries"] / m_off["tries"], m_on["accuracy"] - m_off["accuracy"])
    lines += ["", f"memory_recall: verbatim_tries_ratio {ratios['verbatim'][0]:.2f} reworded_tries_ratio {ratios['reworded'][0]:.2f} "
                  f"accuracy_delta {ratios['all'][1]:+.1f}"]
    return lines

if __name__ == "__main__":
    main()
