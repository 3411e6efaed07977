"""The episodic memory: exact cosine retrieval, no duplicate ids, atomic shards, refusals."""

import os

import pytest
import torch
import torch.nn.functional as F

from lit_latent.config import UserError
from lit_latent.memory import MANIFEST, EpisodicMemory

HIDDEN, D, LATENTS = 8, 6, 3


def batch(n, first=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, D, generator=g)
    z_base = torch.randn(n, LATENTS, HIDDEN, generator=g)
    z_star = z_base + torch.randn(n, LATENTS, HIDDEN, generator=g)
    return e, z_base, z_star, [0.5 + i / 100 for i in range(n)], [f"p{first + i}" for i in range(n)]


def filled(path, sizes=(5, 9, 4)):
    memory, first = EpisodicMemory(path, "tiny", HIDDEN), 0
    for seed, n in enumerate(sizes):
        memory.add(*batch(n, first, seed))
        first += n
    return memory


def test_search_is_brute_force_cosine(tmp_path):
    memory = filled(tmp_path / "memory")
    e, z_base, z_star = memory.tensors()
    assert len(memory) == 18 and e.shape == (18, D) and z_base.shape == z_star.shape == (18, LATENTS, HIDDEN)
    queries = torch.randn(4, D, generator=torch.Generator().manual_seed(9))
    found = memory.search(queries, k=5)
    assert len(found) == 4
    for q, nb in zip(queries, found):
        sims = F.cosine_similarity(q[None], e, dim=1)
        best = sims.argsort(descending=True)[:5]
        assert nb.ids == [memory.ids[i] for i in best]
        torch.testing.assert_close(nb.similarity, sims[best])
        assert torch.equal(nb.e, e[best]) and torch.equal(nb.z_base, z_base[best]) and torch.equal(nb.z_star, z_star[best])
    # one query as a vector; k above the memory size; an empty memory
    assert len(memory.search(queries[0], k=100)[0].ids) == 18
    empty = EpisodicMemory(tmp_path / "empty", "tiny", HIDDEN).search(queries, k=3)
    assert len(empty) == 4 and empty[0].ids == [] and empty[0].z_star.shape[0] == 0


def test_problem_ids_are_never_duplicated(tmp_path):
    memory = EpisodicMemory(tmp_path, "tiny", HIDDEN)
    e, zb, zs, scores, _ = batch(4)
    memory.add(e[:2], zb[:2], zs[:2], scores[:2], ["a", "b"])
    memory.add(e, zb, zs, scores, ["b", "c", "c", "d"])  # b known, c twice in the batch
    assert memory.ids == ["a", "b", "c", "d"]
    assert torch.equal(memory.tensors()[0][2], e[1])  # the first c is kept
    memory.add(e[:2], zb[:2], zs[:2], scores[:2], ["a", "d"])  # nothing new: no shard
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000001.safetensors", "shard-000002.safetensors"]
    assert EpisodicMemory(tmp_path, "tiny", HIDDEN).ids == ["a", "b", "c", "d"]


def test_reload_gives_identical_tensors(tmp_path):
    memory = filled(tmp_path)
    again = EpisodicMemory(tmp_path, "tiny", HIDDEN)
    opened = EpisodicMemory.open(tmp_path)
    for other in (again, opened):
        assert other.ids == memory.ids and other.scores == memory.scores and other.latent_count == LATENTS
        assert all(torch.equal(a, b) for a, b in zip(other.tensors(), memory.tensors()))
    assert opened.model_id == "tiny" and opened.hidden_size == HIDDEN


def test_a_write_killed_before_the_manifest_leaves_the_old_memory(tmp_path, monkeypatch):
    memory = filled(tmp_path, sizes=(5,))
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(MANIFEST):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        memory.add(*batch(3, first=5, seed=1))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "shard-000002.safetensors").is_file()  # written, never listed
    assert len(memory) == 5  # RAM follows the manifest
    reloaded = EpisodicMemory(tmp_path, "tiny", HIDDEN)
    assert reloaded.ids == [f"p{i}" for i in range(5)]
    reloaded.add(*batch(2, first=5, seed=2))  # the leftover shard is replaced
    assert EpisodicMemory(tmp_path, "tiny", HIDDEN).ids == [f"p{i}" for i in range(7)]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_listed_shard_is_named(tmp_path, damage):
    filled(tmp_path)
    shard = tmp_path / "shard-000002.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    with pytest.raises(UserError, match="shard-000002.safetensors") as err:
        EpisodicMemory(tmp_path, "tiny", HIDDEN)
    assert "\n" not in str(err.value)


def test_another_models_memory_is_refused(tmp_path):
    filled(tmp_path)
    with pytest.raises(UserError) as err:
        EpisodicMemory(tmp_path, "other", 64)
    assert str(err.value) == f"memory at {tmp_path} was made with model tiny (hidden {HIDDEN}), not other (hidden 64)"
    with pytest.raises(UserError, match="holds 3 latents per entry, got 2"):
        e, zb, zs, scores, ids = batch(2, first=100)
        EpisodicMemory(tmp_path, "tiny", HIDDEN).add(e, zb[:, :2], zs[:, :2], scores, ids)


def test_missing_memory_and_missing_faiss_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no episodic memory at"):
        EpisodicMemory.open(tmp_path / "nothing")
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install lit_latent\[faiss\]"):
            EpisodicMemory(tmp_path, "tiny", HIDDEN, backend="faiss")
    else:
        memory = EpisodicMemory(None, "tiny", HIDDEN, backend="faiss")
        memory.add(*batch(10))
        exact = EpisodicMemory(None, "tiny", HIDDEN)
        exact.add(*batch(10))
        q = torch.randn(2, D)
        assert [n.ids for n in memory.search(q, 3)] == [n.ids for n in exact.search(q, 3)]


class _ElsewhereTensor(torch.Tensor):
    """A CPU tensor that says it lives on the 'meta' device: stands in for a GPU query here
    (what ops make of it are plain CPU tensors, so only an explicit move reaches 'meta')."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("meta")


def test_neighbours_come_back_on_the_querys_device(tmp_path):
    memory = filled(tmp_path / "memory")
    query = torch.randn(2, D, generator=torch.Generator().manual_seed(3)).as_subclass(_ElsewhereTensor)
    for nb in memory.search(query, k=3):
        assert {t.device.type for t in (nb.e, nb.z_base, nb.z_star, nb.similarity)} == {"meta"}
        assert nb.z_star.shape == (3, LATENTS, HIDDEN) and len(nb.ids) == 3


def test_a_problem_never_retrieves_itself(tmp_path):
    memory = filled(tmp_path / "memory", sizes=(4,))
    e, _, _ = memory.tensors()
    found = memory.search(e[:2].clone(), k=2, exclude_ids=[["p0"], ["p1", "unknown"]])
    assert "p0" not in found[0].ids and "p1" not in found[1].ids and [len(nb.ids) for nb in found] == [2, 2]
    # the best other entry takes the place of the excluded one
    plain = memory.search(e[:1].clone(), k=2)[0]
    assert plain.ids[0] == "p0" and found[0].ids[0] == plain.ids[1]
    # fewer than k entries left: fewer neighbours, none excluded
    assert sorted(memory.search(e[:1].clone(), k=9, exclude_ids=[["p0"]])[0].ids) == ["p1", "p2", "p3"]


def test_manifest_records_whether_labels_scored_the_entries(tmp_path):
    from lit_latent.memory import check_labels

    path = tmp_path / "memory"
    made = EpisodicMemory(path, "tiny", HIDDEN, reward="verifier", uses_labels=True)
    made.add(*batch(2))
    assert made.uses_labels is True
    reopened = EpisodicMemory(path, "tiny", HIDDEN, reward="self", uses_labels=False)
    assert reopened.uses_labels is True and reopened.rewards == ["verifier"]
    reopened.add(*batch(1, first=5))  # a self-reward entry does not wash the labels out
    assert EpisodicMemory.open(path).uses_labels is True and EpisodicMemory.open(path).rewards == ["verifier", "self"]
    with pytest.raises(UserError, match=f"config key memory.path: memory at {path} was made under a reward that uses the gold labels") as err:
        check_labels(reopened.uses_labels, False, "memory.path", f"memory at {path}")
    assert "\n" not in str(err.value)
    check_labels(reopened.uses_labels, True, "memory.path", path)  # a labelled run may use it
    clean = EpisodicMemory(tmp_path / "clean", "tiny", HIDDEN, reward="self", uses_labels=False)
    clean.add(*batch(2))
    assert EpisodicMemory.open(tmp_path / "clean").uses_labels is False
    assert EpisodicMemory(tmp_path / "old", "tiny", HIDDEN).uses_labels is None  # not said


def test_problem_keys_name_the_exact_prompt_and_the_numbers_in_order():
    from lit_latent.memory import problem_keys

    prompt, numbers = problem_keys([5, 6, 7], "Ann has 7 pens and buys 9.")
    assert problem_keys([5, 6, 7], "Bob has 7 cups and gets 9.")[1] == numbers  # reworded: same numbers
    assert problem_keys([5, 6, 8], "Ann has 7 pens and buys 9.")[0] != prompt  # another prompt
    assert problem_keys([5, 6, 7], "Ann has 9 pens and buys 7.")[1] != numbers  # another order
    assert problem_keys([1], "No numbers here.")[1] == 0 and prompt != 0
