"""benchmarks/memory_recall.py: the stream it builds, and the figures it reports."""

import importlib.util
import json
from pathlib import Path

import pytest

from lit_latent.embedded.problems import numbers_in

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_recall", ROOT / "benchmarks" / "memory_recall.py")
memory_recall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_recall)


def test_the_stream_repeats_its_first_half_verbatim_and_reworded_with_the_same_numbers():
    stream = memory_recall.build_stream(40)
    first, again = stream[:20], stream[20:]
    assert len({p["id"] for p in stream}) == 40  # new ids for the second occurrences
    for k, (p, q) in enumerate(zip(first, again)):
        assert q["answer"] == p["answer"]
        if k % 2 == 0:
            assert q["id"] == f"{p['id']}-again" and q["problem"] == p["problem"]
        else:
            assert q["id"] == f"{p['id']}-reworded" and q["problem"] != p["problem"]
            assert numbers_in(q["problem"]) == numbers_in(p["problem"])
    with pytest.raises(SystemExit, match="--n"):
        memory_recall.build_stream(5)


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_the_last_line_gives_the_tries_ratios_and_the_accuracy_delta_of_the_second_occurrences(tmp_path):
    def rec(pid, generations, correct, **extra):
        return {"id": pid, "generations": generations, "tokens": 100 * (1 + generations), "correct": correct, **extra}

    # first occurrences (in the memory-on run only) do not count
    on = write_run(tmp_path / "on", [rec("a", 9, True), rec("b", 9, False), rec("a-again", 0, True, recalled="a"),
                                     rec("b-reworded", 2, True)])
    off = write_run(tmp_path / "off", [rec("a-again", 3, True), rec("b-reworded", 3, False)])
    lines = memory_recall.summary(on, off, 2)
    # verbatim: 1 try against 4; reworded: 3 against 4; accuracy 100 against 50
    assert lines[-1] == "memory_recall: verbatim_tries_ratio 0.25 reworded_tries_ratio 0.75 accuracy_delta +50.0"
    assert "| verbatim | 1 | on | 1.00 | 100 | 100.0 | 1 |" in lines
    with pytest.raises(SystemExit, match="second occurrences"):
        memory_recall.summary(on, off, 3)


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_at_tiny_size(tmp_path, capsys):
    memory_recall.main(["--n", "4", "--out", str(tmp_path), "evolve.max_steps=1", "generation.max_new_tokens=60"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("memory_recall: verbatim_tries_ratio ")
