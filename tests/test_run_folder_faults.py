"""The run folder under a hostile environment: two writers, a full disk, a read-only folder,
corrupt files on disk, bad bytes in inputs, a reward that raises, an interrupted benchmark.
Each fault ends in one line naming the path or key, and loses or doubles nothing."""

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapt
import train
import lit_latent.weaver
from lit_latent.cli import load_config
from lit_latent.config import AdaptConfig, ModelConfig, UserError
from lit_latent.data import read_problems
from lit_latent.memory import EpisodicMemory
from lit_latent.results import append_records, read_records, repair
from lit_latent.runs import LOCK_HOLDER_ENV, run_entry_point

ROOT = Path(__file__).resolve().parents[1]


def write_problems(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i:02d}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)))
    return path


def seek_args(model_dir, data, run_dir, *extra):
    return [f"model.path={model_dir}", f"data.path={data}", f"run_dir={run_dir}", "data.limit=null", "reward.kind=verifier",
            "generation.max_new_tokens=12", "latent.max_iterations=2", "data.batch_size=2", "trainer.accelerator=cpu", *extra]


def one_line(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# --- one writer per run folder ------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_folder_and_holder_and_a_dead_holder_never_blocks(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = write_problems(tmp_path / "p.jsonl", 2)
    env = {k: v for k, v in os.environ.items() if k != LOCK_HOLDER_ENV}  # not a rank of a launch that holds it
    # a writer as adapt.py holds it: flock on <run_dir>/lock, its pid inside
    hold = ("import fcntl, os, sys, time; f = open(os.path.join(sys.argv[1], 'lock'), 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.truncate(0); f.write(f'{os.getpid()}\\n'); f.flush(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "adapt.py", *seek_args(tiny_model_dir, data, run_dir)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        err = one_line(second.stderr)
        assert second.returncode == 2 and str(run_dir) in err and f"pid {holder.pid}" in err
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "predictions.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without letting go: its lock is gone with it, and a run goes ahead
    third = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from lit_latent.runs import hold_lock; "
                            "hold_lock(Path(sys.argv[1]), 'run_dir'); print('held')", str(run_dir)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.strip() == "held", third.stderr


# --- predictions.jsonl: corrupt lines, full disk, read-only folder -----------------------------


def test_a_corrupt_line_is_set_aside_and_every_valid_record_after_it_kept(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    lines = [json.dumps({"id": f"q{i}", "correct": True}).encode() + b"\n" for i in range(6)]
    lines[1] = b'{"id": "q1", "corr\n'  # a damaged line
    lines[3] = b'{"id": "q3", "x": "\xff\xfe"}\n'  # bytes that are not UTF-8
    path.write_bytes(b"".join(lines) + b'{"id": "q6", "cor')  # and a killed run's partial last line
    assert [r["id"] for r in read_records(path)] == ["q0", "q2", "q4", "q5"]
    assert repair(path) == 4
    assert [r["id"] for r in read_records(path)] == ["q0", "q2", "q4", "q5"]
    assert path.read_bytes() == lines[0] + lines[2] + lines[4] + lines[5]
    aside = (tmp_path / "predictions.jsonl.corrupt").read_bytes().splitlines()
    assert aside == [b'line 2: {"id": "q1", "corr', b'line 4: ' + lines[3].rstrip(), b'line 7: {"id": "q6", "cor']
    err = one_line(capsys.readouterr().err)
    assert "warning" in err and "line 2, 4, 7" in err and "predictions.jsonl.corrupt" in err
    assert repair(path) == 4 and capsys.readouterr().err == ""  # nothing more to set aside


def test_a_failed_append_leaves_no_partial_line_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    append_records(path, [{"id": "a"}])
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of the line
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as e:
        append_records(path, [{"id": "b", "output": "x" * 100}, {"id": "c"}])
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs, unmounted after the test; skipped (with the reason) where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem, then free ``leave`` bytes of it."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_stops_in_one_line_without_a_partial_line_and_the_resume_completes(tiny_model_dir, tmp_path, small_tmpfs, capsys):
    data = write_problems(tmp_path / "p.jsonl", 12)
    run_dir = small_tmpfs / "run"
    filler = fill(small_tmpfs, 3 * 4096)  # config.yaml, the lock and a page of records
    rc = run_entry_point(adapt.main, seek_args(tiny_model_dir, data, run_dir))
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and "No space left on device" in err and str(run_dir) in err
    predictions = run_dir / "predictions.jsonl"
    assert predictions.read_bytes().endswith(b"\n")
    assert 0 < len(read_records(predictions)) < 12
    filler.unlink()  # space freed
    assert run_entry_point(adapt.main, seek_args(tiny_model_dir, data, run_dir)) == 0
    assert sorted(r["id"] for r in read_records(predictions)) == [f"q{i:02d}" for i in range(12)]
    assert predictions.read_bytes().count(b"\n") == 12


def test_a_read_only_folder_is_one_line_naming_the_path_new_or_resumed(tiny_model_dir, tmp_path, small_tmpfs, capsys):
    data = write_problems(tmp_path / "p.jsonl", 2)
    old = small_tmpfs / "old"
    old.mkdir()
    (old / "predictions.jsonl").write_text('{"id": "q00", "correct": false}\n{"id": "q01"')
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    for run_dir in (small_tmpfs / "new", old):
        rc = run_entry_point(adapt.main, seek_args(tiny_model_dir, data, run_dir))
        err = one_line(capsys.readouterr().err)
        assert rc == 1 and "Read-only file system" in err and str(run_dir) in err


# --- the memory on disk: never overwritten, checksummed -----------------------------------------


def make_memory(path: Path, n: int) -> list[str]:
    """A memory of n one-entry shards; returns the manifest's text after each add."""
    memory = EpisodicMemory(path, "m", 4)
    manifests = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        memory.add(torch.randn(1, 4, generator=g), torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g),
                   [1.0], [f"p{i}"])
        manifests.append((path / "manifest.json").read_text())
    return manifests


def shard_bytes(path: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*"))}


def test_shards_without_a_manifest_are_refused_not_overwritten(tmp_path):
    path = tmp_path / "memory"
    make_memory(path, 3)
    (path / "manifest.json").unlink()
    before = shard_bytes(path)
    for opening in (lambda: EpisodicMemory(path, "m", 4), lambda: EpisodicMemory.open(path)):
        with pytest.raises(UserError) as e:
            opening()
        msg = one_line(str(e.value))
        assert str(path) in msg and "3 shards but no manifest.json" in msg and "restore" in msg
    assert shard_bytes(path) == before and not (path / "manifest.json").exists()


def test_a_manifest_that_does_not_list_every_shard_is_refused_but_a_killed_writes_shard_is_not(tmp_path):
    path = tmp_path / "memory"
    manifests = make_memory(path, 3)
    (path / "manifest.json").write_text(manifests[0])  # an older manifest: shards 2 and 3 unlisted
    with pytest.raises(UserError) as e:
        EpisodicMemory(path, "m", 4)
    msg = one_line(str(e.value))
    assert "does not list 1 of its shards (shard-000003.safetensors)" in msg and "restore" in msg
    # shard 3 written, its manifest not: a write killed in between, loaded without it
    (path / "manifest.json").write_text(manifests[1])
    assert EpisodicMemory(path, "m", 4).ids == ["p0", "p1"]


def test_flipped_bytes_in_a_shard_fail_its_sha256_and_old_memories_without_one_load(tmp_path):
    path = tmp_path / "memory"
    make_memory(path, 2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    shard = path / "shard-000002.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:])  # inside the tensor data
    with pytest.raises(UserError) as e:
        EpisodicMemory(path, "m", 4)
    msg = one_line(str(e.value))
    assert "shard-000002.safetensors" in msg and "sha256" in msg
    shard.write_bytes(good)
    for s in manifest["shards"]:  # a memory written before checksums
        del s["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert EpisodicMemory(path, "m", 4).ids == ["p0", "p1"]


def test_pending_entries_are_kept_with_a_record_dropped_without_one_and_left_alone_by_readers(tmp_path):
    path = tmp_path / "memory"
    make_memory(path, 1)
    memory = EpisodicMemory(path, "m", 4)
    memory.add(torch.ones(2, 4), torch.ones(2, 2, 4), torch.ones(2, 2, 4), [1.0, 1.0], ["p1", "p2"], pending=True)
    memory.add(torch.ones(1, 4), torch.ones(1, 2, 4), torch.ones(1, 2, 4), [1.0], ["p3"], pending=True)
    assert EpisodicMemory.open(path).ids == ["p0"]  # a reader sees committed entries only
    # the resumed run has records of p0, p1 and p3 (p2's was set aside as corrupt)
    resumed = EpisodicMemory(path, "m", 4, recorded={"p0", "p1", "p3"})
    assert resumed.ids == ["p0", "p3", "p1"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert not any(s.get("pending") for s in manifest["shards"])
    assert manifest["dropped"] == ["shard-000002.safetensors"] and not (path / "shard-000002.safetensors").exists()
    assert EpisodicMemory(path, "m", 4).ids == ["p0", "p3", "p1"]
    memory = EpisodicMemory(path, "m", 4)
    memory.add(torch.ones(1, 4), torch.ones(1, 2, 4), torch.ones(1, 2, 4), [1.0], ["p4"], pending=True)
    memory.commit()
    assert EpisodicMemory.open(path).ids == ["p0", "p3", "p1", "p4"]


# --- input errors: one line naming the file and line, or the key --------------------------------


def test_invalid_utf8_and_null_or_non_string_ids_name_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n"
    for bad, says in ((b'{"id": "b", "problem": "caf\xe9?", "answer": "1"}\n', "not valid UTF-8"),
                      (b'{"id": null, "problem": "2+2?", "answer": "4"}\n', "field 'id' must be a string, got null"),
                      (b'{"id": 7, "problem": "2+2?", "answer": "4"}\n', "field 'id' must be a string, got 7")):
        path.write_bytes(good.encode() + bad)
        with pytest.raises(UserError) as e:
            read_problems(path)
        msg = one_line(str(e.value))
        assert msg.startswith(f"{path}:2: ") and says in msg


@pytest.mark.parametrize("override", ["latent.lr=nan", "latent.lr=inf", "evolve.archive_threshold=-inf"])
def test_nan_or_inf_in_a_numeric_config_key_is_refused_naming_the_key(override):
    with pytest.raises(UserError) as e:
        load_config(AdaptConfig, [], [override])
    assert one_line(str(e.value)).startswith(f"config key {override.split('=')[0]}: ") and "not a finite number" in str(e.value)


def test_nan_weights_are_refused_saying_so(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_latent.generation import load_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nan")
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(path=str(tmp_path / "nan")))
    msg = one_line(str(e.value))
    assert "config key model.path" in msg and "NaN or inf in its weights (model.layers.1.mlp.up_proj.weight)" in msg


class Killed(BaseException):
    pass


def test_a_truncated_last_ckpt_starts_the_fit_afresh_with_a_warning(tmp_path, monkeypatch, capsys):
    memory = tmp_path / "memory"
    g = torch.Generator().manual_seed(0)
    EpisodicMemory(memory, "m", 8).add(torch.randn(6, 8, generator=g), torch.randn(6, 2, 8, generator=g),
                                        torch.randn(6, 2, 8, generator=g), [1.0] * 6, [f"p{i}" for i in range(6)])
    argv = [f"memory.path={memory}", f"out={tmp_path / 'weaver'}", "weaver.max_epochs=2", "trainer.accelerator=cpu"]

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as mp:  # a fit killed after its epochs: last.ckpt left to resume from
        mp.setattr(lit_latent.weaver, "save_weaver", killed)
        with pytest.raises(Killed):
            train.main(argv)
    last = tmp_path / "weaver" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:200])  # truncated (a full disk, a copy cut short)
    capsys.readouterr()
    assert run_entry_point(train.main, argv) == 0
    assert "is truncated or not a Lightning checkpoint: starting the fit afresh" in capsys.readouterr().out
    assert (tmp_path / "weaver" / "weaver.safetensors").is_file()


def test_a_custom_reward_that_raises_names_its_class_and_problem_and_the_run_resumes(tiny_model_dir, tmp_path, capsys):
    data = write_problems(tmp_path / "p.jsonl", 6)
    run_dir = tmp_path / "run"
    rc = run_entry_point(adapt.main, seek_args(tiny_model_dir, data, run_dir, "reward.kind=custom",
                                               "reward.class_path=custom_rewards.RaisesOn", "reward.kwargs.bad=q03"))
    msg = one_line(capsys.readouterr().err)
    assert rc == 2 and "custom_rewards.RaisesOn.score raised KeyError" in msg and "q03" in msg
    assert [r["id"] for r in read_records(run_dir / "predictions.jsonl")] == ["q00", "q01"]
    assert run_entry_point(adapt.main, seek_args(tiny_model_dir, data, run_dir)) == 0
    assert [r["id"] for r in read_records(run_dir / "predictions.jsonl")] == [f"q{i:02d}" for i in range(6)]


# --- benchmarks ---------------------------------------------------------------------------------


def test_adapt_speed_fails_on_a_run_stopped_by_sigterm_instead_of_printing_a_figure(tiny_model_dir, tmp_path, capsys):
    from lit_latent.generation import load_model
    from lit_latent.rewards import Reward, Scores

    spec = importlib.util.spec_from_file_location("adapt_speed", ROOT / "benchmarks" / "adapt_speed.py")
    adapt_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapt_speed)

    class SigtermOnFirstScore(Reward):
        def score(self, engine, problems, completions):
            if not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # caught by Lightning's handler, as a real SIGTERM is
            return Scores([0.0] * len(problems), [0] * len(problems))

    model, tokenizer = load_model(ModelConfig(path=str(tiny_model_dir)))
    problems = read_problems(write_problems(tmp_path / "p.jsonl", 4))
    overrides = [f"model.path={tiny_model_dir}", "data.batch_size=1", "trainer.accelerator=cpu", "generation.max_new_tokens=6",
                 "latent.max_iterations=1", "perf.reference_mode=true"]
    with pytest.raises(SystemExit) as e:
        adapt_speed.run_method(model, tokenizer, problems, overrides, False, SigtermOnFirstScore())
    assert "SIGTERM" in str(e.value.code) and "no figure" in str(e.value.code)
