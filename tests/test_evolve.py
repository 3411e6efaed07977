"""LatentEvolve end to end on a tiny model: momentum transfer, archiving, nights, train.py -> adapt.py."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import adapt
import train
from custom_rewards import IdReward
from lit_latent.rewards import Reward, Scores, VerifierReward
from lit_latent.config import AdaptConfig, EvolveConfig, GenerationConfig, UserError
from lit_latent.data import ProblemDataModule
from lit_latent.engine import Engine
from lit_latent.module import LatentAdaptationModule
from lit_latent.latents import decode_latents, momentum_init
from lit_latent.memory import EpisodicMemory
from lit_latent.results import read_records
from lit_latent.runs import run_entry_point

ROOT = Path(__file__).resolve().parents[1]


def test_momentum_transfer_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    z_base, e = torch.randn(4, 8, generator=g), torch.randn(6, generator=g)
    nb_e, nb_zb, nb_zs = torch.randn(3, 6, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    cos = torch.stack([torch.dot(e, x) / (e.norm() * x.norm()) for x in nb_e])
    alpha = torch.exp(cos) / torch.exp(cos).sum()
    expected = z_base + sum(alpha[j] * (nb_zs[j] - nb_zb[j]) for j in range(3))
    torch.testing.assert_close(momentum_init(z_base, nb_e, e, nb_zs, nb_zb), expected)
    torch.testing.assert_close(momentum_init(z_base, nb_e[:0], e, nb_zs[:0], nb_zb[:0]), z_base)


@pytest.fixture()
def ten_problems(tmp_path):
    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "problem": f"{i} times 2?", "answer": str(2 * i)}) + "\n" for i in range(10)))
    return path


def evolve_args(model_dir, data, run_dir, *extra):
    return ["--config", str(ROOT / "configs" / "latentevolve.yaml"), f"model.path={model_dir}", f"data.path={data}",
            f"run_dir={run_dir}", "generation.max_new_tokens=6", "evolve.samples=2", "evolve.max_steps=2",
            "evolve.latent_count=3", "data.batch_size=4", "trainer.accelerator=cpu", "reward.kind=custom",
            "reward.class_path=custom_rewards.IdReward", "reward.kwargs.good=[e1,e3,e4,e8]", "weaver.max_epochs=2", *extra]


def test_day_night_archive_threshold_and_weaver_round_trip(tiny_model_dir, ten_problems, tmp_path, capsys):
    run_dir = tmp_path / "day"
    # baseline none: the good problems' equal rewards still move their latents, so z* has edits
    adapt.main(evolve_args(tiny_model_dir, ten_problems, run_dir, "evolve.night_every=4", "evolve.baseline=none"))
    nights = [line[line.index("night "):] for line in capsys.readouterr().out.splitlines() if "night " in line]
    records = read_records(run_dir / "predictions.jsonl")
    assert len(records) == 10
    # archived exactly when the final mean reward reaches tau = 0.5
    assert {r["id"] for r in records if r["archived"]} == {"e1", "e3", "e4", "e8"}
    memory = EpisodicMemory.open(run_dir / "memory")
    assert sorted(memory.ids) == ["e1", "e3", "e4", "e8"]
    e, z_base, z_star = memory.tensors()
    assert z_base.shape == z_star.shape == (4, 3, 32) and e.shape == (4, 32)
    # nights after 4 and 8 problems (the first has 2 memories, the second 3): two weavers written
    assert sorted(p.name for p in (run_dir / "weaver").glob("night-*")) == ["night-001", "night-002"]
    # each night says how many of its memories hold an edit (z* != z_base)
    edited = (z_star != z_base).flatten(1).any(1).tolist()
    assert [n.split(" problems: ")[1].split(",")[0] for n in nights] == [
        f"weaver on 2 memories ({sum(edited[:2])} with z* != z_base)", f"weaver on 3 memories ({sum(edited[:3])} with z* != z_base)"]
    # the memory grows at each batch's end (batches of 4): problems 5-8 retrieve the first batch's
    # archive, 9-10 the first two batches' (top_k 5 > entries, so all of them); never themselves
    assert all(sorted(r["neighbours"]) == ["e1", "e3"] for r in records[4:8])
    assert all(sorted(r["neighbours"]) == ["e1", "e3", "e4"] for r in records[8:])
    assert "neighbours" not in records[0]

    # night-time consolidation from the logged day, then a day that uses the weaver
    assert run_entry_point(train.main, [f"run_dir={run_dir}", "weaver.max_epochs=3"]) == 0
    checkpoint = run_dir / "weaver"
    assert (checkpoint / "weaver.safetensors").is_file()
    second = tmp_path / "day2"
    adapt.main(evolve_args(tiny_model_dir, ten_problems, second, f"weaver.checkpoint={checkpoint}", "evolve.night_every=0",
                           f"memory.path={run_dir / 'memory'}"))
    assert len(read_records(second / "predictions.jsonl")) == 10


def test_memory_of_another_model_is_refused(tiny_model_dir, ten_problems, tmp_path, capsys):
    memory = EpisodicMemory(tmp_path / "mem", "some-other-model", 64)
    memory.add(torch.zeros(1, 64), torch.zeros(1, 3, 64), torch.zeros(1, 3, 64), [1.0], ["x"])
    rc = run_entry_point(adapt.main, evolve_args(tiny_model_dir, ten_problems, tmp_path / "r", f"memory.path={tmp_path / 'mem'}"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "some-other-model" in err and "\n" not in err


def test_train_py_under_two_process_ddp_writes_a_checkpoint_adapt_loads(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from lit_latent.generation import model_id
    from lit_latent.weaver import load_weaver

    g = torch.Generator().manual_seed(0)
    memory = EpisodicMemory(tmp_path / "mem", model_id(tiny_model_dir), 32)
    e, z_base = torch.randn(24, 32, generator=g), torch.randn(24, 3, 32, generator=g)
    memory.add(e, z_base, z_base + 0.5 * e[:, None, :], [1.0] * 24, [f"m{i}" for i in range(24)])
    out = tmp_path / "weaver"
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"memory.path={tmp_path / 'mem'}", f"out={out}",
                          "weaver.max_epochs=3", "trainer.accelerator=cpu", "trainer.devices=2",
                          "trainer.strategy=ddp"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("weaver saved to") == 1  # one report, from rank 0
    weaver = load_weaver(out, 32, model_id(tiny_model_dir), latent_count=3)
    assert weaver(e[:2], z_base[:2]).shape == (2, 3, 32)


class PaysByCount(Reward):
    """1 for the n-th text scored for a problem where ``pays(n)`` (n from 1), else 0."""

    def __init__(self, pays):
        self.pays = pays
        self.seen: dict[str, int] = {}

    def score(self, engine, problems, completions):
        for p in problems:
            self.seen[p["id"]] = self.seen.get(p["id"], 0) + 1
        return Scores([float(self.pays(self.seen[p["id"]])) for p in problems], [0] * len(problems))


def first_step_pays() -> PaysByCount:
    """Every sample of a problem's first refinement step earns 1, later ones 0 (2 samples per step)."""
    return PaysByCount(lambda n: n <= 2)


def evolve_day(model, tokenizer, reward, reference_mode=False, **evolve):
    cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
    cfg.perf.reference_mode = reference_mode
    cfg.evolve = EvolveConfig(**{**dict(latent_count=3, samples=2, max_steps=4, patience=3, lr=0.5, night_every=0), **evolve})
    module = LatentAdaptationModule(model, tokenizer, cfg, reward)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, inference_mode=False,
                        enable_progress_bar=False, enable_model_summary=False)
    problems = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i), "choices": None} for i in range(3)]
    out = trainer.predict(module, datamodule=ProblemDataModule(problems, batch_size=3))
    return [r for batch in out for r in batch]


def generate_batches(monkeypatch) -> list[int]:
    """The batch size of every Engine.generate call from now on, in order."""
    calls: list[int] = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, **kw: calls.append(len(prompts)) or real(self, prompts, **kw))
    return calls


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_answer_best_answers_and_archives_the_best_scoring_latents(tiny_model, char_tokenizer):
    # only the first step's samples pay: "best" keeps the starting latents (z_base: no memory,
    # no weaver), so the answer is the greedy CoT again; "last" answers from the moved latents
    # (no baseline: with one, equal rewards of a step would leave the latents where they are)
    best = evolve_day(tiny_model, char_tokenizer, first_step_pays(), answer="best", baseline="none")
    for r in best:
        assert r["rewards"] == [1.0, 0.0, 0.0, 0.0]  # stopped after 3 steps without gain
        assert r["final_mean_reward"] == 1.0 and r["_archive"]["score"] == 1.0
        torch.testing.assert_close(r["_archive"]["z_star"], r["_archive"]["z_base"])
        # the greedy CoT again (cut at max_new_tokens; from the latents it gets that many more)
        assert r["output"].startswith(r["initial_output"])
    final = evolve_day(tiny_model, char_tokenizer, first_step_pays(), answer="last", baseline="none")
    for r in final:
        assert r["final_mean_reward"] == 0.0 and r["_archive"]["score"] == 0.0
        assert not torch.equal(r["_archive"]["z_star"], r["_archive"]["z_base"])


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
@pytest.mark.parametrize("regenerate", [True, False])
def test_regenerate_after_first_change_cuts_sampled_prefixes_after_their_first_change(tiny_model, char_tokenizer, monkeypatch, regenerate):
    # hot samples (temperature 50) differ from the CoT's opening early; with the option each
    # prefix handed to generation is the CoT's opening through its first changed token
    calls = []
    real = Engine.generate

    def spy(self, prompts, **kw):
        out = real(self, prompts, **kw)
        calls.append((kw.get("prefixes"), out.tokens if kw.get("return_hidden") else None))
        return out

    monkeypatch.setattr(Engine, "generate", spy)
    evolve_day(tiny_model, char_tokenizer, first_step_pays(), regenerate_after_first_change=regenerate, sample_temperature=50.0)
    cot = [t[:3] for t in calls[0][1]]  # the greedy CoT's first L' = 3 tokens, per problem
    sampled = [p for prefixes, _ in calls[1:-1] for p in prefixes]  # the last call answers from z*
    assert len(sampled) >= 3 * 2 * 4  # 3 problems x M = 2 x 4 steps

    def cut_after_first_change(prefix):
        return any(prefix[:k] == c[:k] and prefix[k] != c[k] and len(prefix) == k + 1 for c in cot for k in range(3))

    changed = [p for p in sampled if p not in cot]
    assert len(changed) > len(sampled) // 2
    if regenerate:
        assert all(cut_after_first_change(p) for p in changed)
    else:
        assert all(len(p) == 3 for p in sampled) and not all(cut_after_first_change(p) for p in changed)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_a_sampled_prefix_met_before_is_generated_and_scored_once(tiny_model, char_tokenizer, monkeypatch):
    # cold samples and a step too small to flip a token: every sample of every step is the CoT's
    # opening, so with a deterministic reward the fast path generates and scores it once per problem
    calls = generate_batches(monkeypatch)
    fast = evolve_day(tiny_model, char_tokenizer, VerifierReward(), sample_temperature=0.01, lr=1e-6)
    assert calls == [3, 3, 3]  # the CoT, the one distinct prefix of each problem, the answer from z*
    assert all(r["iterations"] == 4 for r in fast)  # equal mean rewards: the patience of 3 runs out
    calls.clear()
    slow = evolve_day(tiny_model, char_tokenizer, VerifierReward(), reference_mode=True, sample_temperature=0.01, lr=1e-6)
    assert sum(calls) == 3 + 3 * 2 * 4 + 3  # the reference generates all M = 2 samples of 4 steps
    keys = ("output", "final_answer", "rewards", "iterations", "final_mean_reward")
    assert [{k: r[k] for k in keys} for r in fast] == [{k: r[k] for k in keys} for r in slow]
    assert all(s["tokens"] > f["tokens"] for f, s in zip(fast, slow))


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_baseline_one_pushes_away_from_equal_samples_the_mean_baseline_leaves_alone(tiny_model, char_tokenizer):
    # the random model answers wrong: every sample earns 0. Against their mean the advantage is
    # 0 and z* stays z_base; against 1 (LatentSeek's reward - 1) each sample is pushed away from
    for baseline, moves in (("mean", False), ("none", False), ("one", True)):
        for r in evolve_day(tiny_model, char_tokenizer, VerifierReward(), sample_temperature=0.01, baseline=baseline):
            assert set(r["rewards"]) == {0.0}
            assert torch.equal(r["_archive"]["z_star"], r["_archive"]["z_base"]) is not moves, baseline


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_stop_threshold_keeps_a_cot_the_reward_passes_without_refining_it(tiny_model, char_tokenizer, monkeypatch):
    calls = generate_batches(monkeypatch)
    every = ["q0", "q1", "q2"]
    kept = evolve_day(tiny_model, char_tokenizer, IdReward(every), stop_threshold=0.8)
    assert calls == [3]  # the CoT only
    for r in kept:
        assert r["iterations"] == 0 and r["cot_reward"] == 1.0 and "_archive" not in r
        assert r["output"] == r["initial_output"]
    calls.clear()
    refined = evolve_day(tiny_model, char_tokenizer, IdReward([]), stop_threshold=0.8)  # under the threshold
    assert all(r["iterations"] > 0 and "_archive" in r for r in refined) and len(calls) > 1
    paper = evolve_day(tiny_model, char_tokenizer, IdReward(every))  # null: every problem is refined
    assert all(r["iterations"] > 0 and "cot_reward" not in r for r in paper)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_stop_threshold_ends_the_refinement_at_the_first_step_a_sample_passes(tiny_model, char_tokenizer):
    # the CoT and step 1's two samples fail, step 2's pass: the refinement stops there, not at
    # max_steps 4 (patience 3 would not stop it either: the mean reward rises at step 2)
    records = evolve_day(tiny_model, char_tokenizer, PaysByCount(lambda n: n > 3), stop_threshold=0.8)
    for r in records:
        assert r["iterations"] == 2
        assert [c["best_reward"] for c in r["candidates"]] == [0.0, 1.0]
    # without a threshold (the paper) it refines on
    assert all(r["iterations"] == 4 for r in evolve_day(tiny_model, char_tokenizer, PaysByCount(lambda n: n > 2)))


class TextReward(Reward):
    """A fixed pseudo-random reward in [0, 0.5) per text; the first text scored for a problem
    (with evolve.stop_threshold: its CoT) earns ``first`` instead."""

    deterministic = True

    def __init__(self, first: float = 0.0):
        self.first = first
        self.seen: set[str] = set()
        self.scored: dict[str, float] = {}

    def score(self, engine, problems, completions):
        rewards = []
        for p, text in zip(problems, completions):
            q = self.first if p["id"] not in self.seen and self.first else sum(map(ord, text)) % 50 / 100
            self.seen.add(p["id"])
            self.scored.setdefault(text, q)
            rewards.append(q)
        return Scores(rewards, [0] * len(problems))


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
@pytest.mark.parametrize("rho", [None, 1.0])
def test_rho_refines_the_answers_later_latents_and_the_memory_keeps_the_first(tiny_model, char_tokenizer, monkeypatch, rho):
    # the random model writes max_new_tokens = 8 tokens: rho 1.0 refines all 8 latents, the
    # paper's null the first L' = 3; either way z* (what the memory archives) is L' latents long
    prefixes = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate",
                        lambda self, prompts, **kw: prefixes.extend(kw.get("prefixes") or []) or real(self, prompts, **kw))
    records = evolve_day(tiny_model, char_tokenizer, TextReward(), rho=rho, sample_temperature=50.0)
    refined = 8 if rho else 3
    assert {len(p) for p in prefixes} == {refined}
    for r in records:
        assert len(r["latent_tokens"]) == refined
        assert r["_archive"]["z_star"].shape == r["_archive"]["z_base"].shape == (3, 32)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_answer_sample_answers_with_the_best_scored_sample_and_keeps_a_better_scored_cot(tiny_model, char_tokenizer, monkeypatch):
    calls = generate_batches(monkeypatch)
    reward = TextReward()
    records = evolve_day(tiny_model, char_tokenizer, reward, answer="sample", sample_temperature=50.0)
    assert len(calls) == 1 + 4  # the CoT and 4 steps of samples; nothing is generated from z*
    for r in records:
        best = max(c["best_reward"] for c in r["candidates"])
        assert reward.scored[r["output"]] == best
        assert best > min(c["best_reward"] for c in r["candidates"])  # the samples differ: a real choice
    # the scored CoT (0.6 > any sample's 0.49, under the 0.8 threshold) competes, and wins
    kept = evolve_day(tiny_model, char_tokenizer, TextReward(first=0.6), answer="sample", stop_threshold=0.8, sample_temperature=50.0)
    assert all(r["iterations"] > 0 and r["output"] == r["initial_output"] for r in kept)


class Shift(torch.nn.Module):
    """A stand-in weaver: z_base -> z_base + a fixed offset."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, e, z_base):
        return z_base + self.offset


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_starting_latents_are_the_weavers_map_plus_the_momentum_of_known_neighbours(tiny_model, char_tokenizer, tmp_path, monkeypatch):
    from lit_latent import search as search_lib
    from lit_latent.methods.latentevolve import latent_evolve

    cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
    cfg.evolve = EvolveConfig(latent_count=3, samples=2, max_steps=1, top_k=3, night_every=0)
    engine = Engine(tiny_model, char_tokenizer, cfg)
    problems = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i), "choices": None} for i in range(2)]
    # three remembered problems with known edits z* - z_base
    g = torch.Generator().manual_seed(1)
    mem_e, mem_zb = torch.randn(3, 32, generator=g), torch.randn(3, 3, 32, generator=g)
    edits = torch.randn(3, 3, 32, generator=g)
    memory = EpisodicMemory(tmp_path / "mem", "tiny", 32)
    memory.add(mem_e, mem_zb, mem_zb + edits, [1.0] * 3, ["m0", "m1", "m2"])
    offset = torch.full((3, 32), 0.25)
    starts = {}
    real_add = search_lib.LatentSearch.add

    def spy(self, i, start):
        starts[i] = start.clone()
        real_add(self, i, start)

    monkeypatch.setattr(search_lib.LatentSearch, "add", spy)
    with torch.enable_grad():
        records = latent_evolve(engine, problems, IdReward([]), cfg.evolve, memory, Shift(offset))

    # what the method should start from, worked out here: e is the prompt's last post-norm state,
    # z_base the CoT's first 3 latents, weights softmax over the cosines with the 3 memories
    prompts = engine.encode(problems)
    first = engine.generate(prompts, return_hidden=True)
    for i, ids in enumerate(prompts):
        e = tiny_model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        cos = torch.tensor([float(e @ m / (e.norm() * m.norm())) for m in mem_e])
        alpha = cos.exp() / cos.exp().sum()
        expected = first.hidden[i][:3] + offset + sum(alpha[j] * edits[j] for j in range(3))
        torch.testing.assert_close(starts[i], expected, atol=1e-4, rtol=1e-4)
        assert sorted(records[i]["neighbours"]) == ["m0", "m1", "m2"]
    # the weaver and the transfer really moved the start away from z_base
    assert all(float((starts[i] - first.hidden[i][:3]).abs().max()) > 0.2 for i in starts)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_archive_own_edit_leaves_out_what_the_start_inherited(tiny_model, char_tokenizer, tmp_path, monkeypatch):
    # the paper archives z* itself, so a start's weaver offset and transferred momentum go into
    # the memory again and compound along a stream; own_edit archives z_base + (z* - z_0)
    from lit_latent import search as search_lib
    from lit_latent.methods.latentevolve import latent_evolve

    g = torch.Generator().manual_seed(2)
    memory = EpisodicMemory(tmp_path / "mem", "tiny", 32)
    mem_zb = torch.randn(3, 3, 32, generator=g)
    memory.add(torch.randn(3, 32, generator=g), mem_zb, mem_zb + torch.randn(3, 3, 32, generator=g), [1.0] * 3, ["m0", "m1", "m2"])
    problems = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i), "choices": None} for i in range(2)]
    starts = {}
    real_add = search_lib.LatentSearch.add
    monkeypatch.setattr(search_lib.LatentSearch, "add", lambda self, i, start: starts.update({i: start.clone()}) or real_add(self, i, start))

    def archived(archive):
        cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
        # baseline one: every sample of the random model earns 0 and is pushed away from, so z* moves
        cfg.evolve = EvolveConfig(latent_count=3, samples=2, max_steps=2, top_k=3, night_every=0, baseline="one", archive=archive)
        with torch.enable_grad():
            records = latent_evolve(Engine(tiny_model, char_tokenizer, cfg), problems, VerifierReward(), cfg.evolve,
                                    memory, Shift(torch.full((3, 32), 0.25)))
        return [r["_archive"] for r in records]

    paper, own = archived("z_star"), archived("own_edit")
    for i, (p, o) in enumerate(zip(paper, own)):
        torch.testing.assert_close(o["z_base"], p["z_base"])
        inherited = starts[i] - p["z_base"]  # the weaver's 0.25 and the neighbours' momentum
        assert float(inherited.abs().max()) > 0.2
        torch.testing.assert_close(o["z_star"], p["z_star"] - inherited)
        assert float((o["z_star"] - o["z_base"]).abs().max()) > 1e-3  # the problem's own edit is kept
    with pytest.raises(UserError, match="evolve.archive"):
        EvolveConfig(archive="everything")


# --- the anchored day search (evolve.samples=1), the answer archive and recall ---------------------

def anchored(**evolve) -> dict:
    return {**dict(samples=1, max_steps=4, stop_threshold=0.8, answer="best", archive="answer"), **evolve}


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_a_passing_refinement_archives_the_latents_behind_its_answer(tiny_model, char_tokenizer, tmp_path):
    # the CoT and the first candidate fail, the second passes: what is archived must be what led
    # to that answer (latents that decode to its prefix) and the iterations spent, not z_base
    records = evolve_day(tiny_model, char_tokenizer, PaysByCount(lambda n: n >= 3), **anchored(reanchor=True))
    head = tiny_model.get_output_embeddings()
    memory = EpisodicMemory(tmp_path / "mem", "tiny", 32)
    from types import SimpleNamespace

    from callbacks.memory import MemoryCallback

    one_process = SimpleNamespace(world_size=1)  # the callback shares entries between ranks only under DDP
    MemoryCallback(memory, threshold=0.5).on_predict_batch_end(one_process, None, records, None, 0)
    memory.commit()  # the batch's records are written: its entries are no longer pending
    for r in records:
        assert r["rewards"] == [0.0, 0.0, 1.0] and r["chosen_candidate"] == 2 and r["archived"]
        found = r["_archive"]["answer"]
        passing = r["candidates"][1]["output"]
        decoded = char_tokenizer.decode(decode_latents(head, found))
        assert len(decoded) > 0 and passing.startswith(decoded)  # the reanchored latents decode to the passing answer
        torch.testing.assert_close(r["_archive"]["z_star"], found[:3])
        assert r["_archive"]["iterations"] == 2
    # the memory keeps them, and gives them back on retrieval
    reopened = EpisodicMemory.open(tmp_path / "mem")
    nb = reopened.search(records[0]["_archive"]["e"], 1)[0]
    assert nb.ids == [records[0]["id"]] and nb.iterations == [2]
    assert nb.keys == [records[0]["_archive"]["keys"]] and all(k != 0 for k in nb.keys[0])  # how it is recognised again
    torch.testing.assert_close(nb.answers[0], records[0]["_archive"]["answer"])
    # a search without the answer archive (the paper's rule) stores no answer
    plain = evolve_day(tiny_model, char_tokenizer, PaysByCount(lambda n: n >= 3), **anchored(archive="z_star"))
    assert all("answer" not in r["_archive"] for r in plain)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_a_recurring_problem_retrieves_its_earlier_occurrence_first_and_starts_from_its_answer(tiny_model, char_tokenizer, tmp_path):
    from lit_latent.methods.latentevolve import latent_evolve

    cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
    cfg.evolve = EvolveConfig(latent_count=3, top_k=2, night_every=0, lr=0.5, recall=0.999, **anchored(reanchor=True))
    engine = Engine(tiny_model, char_tokenizer, cfg)
    problems = [{"id": f"q{i}", "problem": f"What is {i} + {3 * i}?", "answer": str(4 * i), "choices": None} for i in range(1, 4)]
    memory = EpisodicMemory(None, "tiny", 32)
    reward = PaysByCount(lambda n: n >= 3)  # per problem id: the CoT and the first candidate fail
    with torch.enable_grad():
        first = latent_evolve(engine, problems, reward, cfg.evolve, memory)
    for r in first:
        a = r["_archive"]
        memory.add(a["e"][None], a["z_base"][None], a["z_star"][None], [a["score"]], [r["id"]], [a["answer"]], [a["iterations"]], [a["keys"]])
    # the same problems again under new ids, in another order: found by their content
    again = [dict(p, id=f"{p['id']}-again") for p in reversed(problems)]
    with torch.enable_grad():
        second = latent_evolve(engine, again, PaysByCount(lambda n: True), cfg.evolve, memory)
    for p, r in zip(again, second):
        earlier = p["id"].removesuffix("-again")
        assert r["neighbours"][0] == earlier and r["recalled"] == earlier
        # its initial answer is the answer its earlier occurrence found, with no search on top
        assert r["initial_output"] == next(f["output"] for f in first if f["id"] == earlier)
        assert r["generations"] == 0 and r["correct"] == next(f["correct"] for f in first if f["id"] == earlier)
    # below the recall similarity, the greedy CoT and a search as usual
    cfg.evolve.recall = None
    with torch.enable_grad():
        fresh = latent_evolve(engine, again, PaysByCount(lambda n: n >= 3), cfg.evolve, memory)
    assert all("recalled" not in r and r["generations"] == 2 for r in fresh)


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_a_recalled_search_has_only_the_iterations_its_earlier_search_left(tiny_model, char_tokenizer, monkeypatch):
    from lit_latent.methods import latentevolve
    from lit_latent.methods.latentevolve import latent_evolve

    cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
    cfg.evolve = EvolveConfig(latent_count=3, top_k=1, night_every=0, lr=0.5, recall=0.999, **anchored(reanchor=True))
    engine = Engine(tiny_model, char_tokenizer, cfg)
    problem = {"id": "q1", "problem": "What is 7 + 9?", "answer": "16", "choices": None}
    memory = EpisodicMemory(None, "tiny", 32)
    with torch.enable_grad():
        [r] = latent_evolve(engine, [problem], PaysByCount(lambda n: False), cfg.evolve, memory)
    a = r["_archive"]
    assert a["iterations"] == 4  # K spent without a pass
    memory.add(a["e"][None], a["z_base"][None], a["z_star"][None], [a["score"]], ["q1"], [a["answer"]], [a["iterations"]], [a["keys"]])
    with torch.enable_grad():
        [again] = latent_evolve(engine, [dict(problem, id="q1-again")], PaysByCount(lambda n: False), cfg.evolve, memory)
    assert again["recalled"] == "q1" and again["generations"] == 0  # nothing left to search: its best answer stands
    # the same numbers under other words are not given an answer whose search failed (at any
    # cosine here: the tiny model's e cannot tell prompts apart): its own CoT and a whole K
    cfg.evolve.recall = -1.0
    with torch.enable_grad():
        [other] = latent_evolve(engine, [dict(problem, id="q2", problem="Add 7 and 9.")], PaysByCount(lambda n: False), cfg.evolve, memory)
    assert "recalled" not in other and other["neighbours"] == ["q1"] and other["iterations"] == 4


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)
def test_a_problem_reworded_with_the_same_numbers_starts_from_a_passing_answer_other_numbers_do_not(tiny_model, char_tokenizer):
    from lit_latent.methods.latentevolve import latent_evolve

    cfg = AdaptConfig(method="latentevolve", generation=GenerationConfig(max_new_tokens=8))
    cfg.evolve = EvolveConfig(latent_count=3, top_k=2, night_every=0, lr=0.5, recall=-1.0, **anchored(reanchor=True))
    engine = Engine(tiny_model, char_tokenizer, cfg)
    problem = {"id": "q1", "problem": "Ann has 7 pens and buys 9. How many?", "answer": "16", "choices": None}
    memory = EpisodicMemory(None, "tiny", 32)
    with torch.enable_grad():
        [first] = latent_evolve(engine, [problem], PaysByCount(lambda n: n >= 3), cfg.evolve, memory)
    a = first["_archive"]
    assert a["score"] == 1.0 and a["iterations"] == 2
    memory.add(a["e"][None], a["z_base"][None], a["z_star"][None], [a["score"]], ["q1"], [a["answer"]], [a["iterations"]], [a["keys"]])
    reworded = dict(problem, id="q1-reworded", problem="Bob has 7 cups and gets 9. How many?")
    other = dict(problem, id="q9", problem="Ann has 9 pens and buys 7. How many?")  # the numbers in another order
    reward = PaysByCount(lambda n: n >= 3)
    reward.seen[reworded["id"]] = 2  # its first answer scored passes: the recalled one
    with torch.enable_grad():
        again, fresh = latent_evolve(engine, [reworded, other], reward, cfg.evolve, memory)
    # the reworded one starts from the remembered answer (its latents' prefix, finished here) and,
    # passing, needs no search; the other starts from its own CoT and searches as usual
    assert again["recalled"] == "q1" and again["generations"] == 0 and again["rewards"] == [1.0]
    prefix = char_tokenizer.decode(decode_latents(tiny_model.get_output_embeddings(), a["answer"]))
    assert again["initial_output"].startswith(prefix) and len(prefix) > 0
    assert "recalled" not in fresh and fresh["neighbours"] == ["q1"] and fresh["generations"] == 2
    # a reworded problem below the recall similarity is not recalled
    cfg.evolve.recall = 1.0
    with torch.enable_grad():
        [below] = latent_evolve(engine, [dict(reworded, id="q1-reworded-2")], PaysByCount(lambda n: n >= 3), cfg.evolve, memory)
    assert "recalled" not in below and below["generations"] == 2


def test_answer_archive_and_recall_need_the_greedy_search():
    with pytest.raises(UserError, match="evolve.archive: answer .* evolve.samples=1"):
        EvolveConfig(archive="answer")
    with pytest.raises(UserError, match="evolve.recall: .* evolve.samples=1"):
        EvolveConfig(recall=0.99)
    with pytest.raises(UserError, match="evolve.edit_from: .* evolve.samples=1"):
        EvolveConfig(edit_from="first_failing_line")
    EvolveConfig(samples=1, archive="answer", recall=0.99, edit_from="first_failing_line", reanchor=True)
