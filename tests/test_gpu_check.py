"""benchmarks/gpu_check.py runs on a CPU too (smaller), so the script a lent GPU runs is tested here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_gpu_check_runs_on_cpu_and_our_decode_matches_model_generate(capsys):
    assert gpu_check.main(["--device", "cpu", "--n", "3", "--max-new-tokens", "12", "--models", "embedded",
                           "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # greedy decoding: ours and transformers' generate give the same tokens on every row
    assert "rows decoded alike 3/3" in out
    assert "LatentSeek (configs/latentseek.yaml, verifier) on 3 problems" in out
    last = out.strip().splitlines()[-1].split()
    assert last[:3] == ["gpu_check:", "embedded", "problems_per_s"] and float(last[3]) > 0
    assert last[4] == "decode_ratio" and float(last[5]) > 0 and last[6] == "peak_gib" and float(last[7]) > 0


def test_gpu_check_refuses_an_unknown_model_in_one_line():
    try:
        gpu_check.main(["--device", "cpu", "--models", "embedded,llama70b"])
    except SystemExit as e:
        assert str(e) == "gpu_check: unknown --models entry 'llama70b' (choose from embedded, qwen05b)"
    else:
        raise AssertionError("an unknown --models entry was accepted")
