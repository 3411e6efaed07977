import copy

import torch

from conftest import token_ids
from lit_latent.generation import generate


def test_cached_hidden_states_match_full_recompute(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["12 + 3 =", "a much longer prompt here", "x"])
    kw = dict(max_new_tokens=12, eos_ids=[1], pad_id=0, return_hidden=True)
    fast = generate(tiny_model, prompts, use_cache=True, **kw)
    slow = generate(tiny_model, prompts, use_cache=False, **kw)
    assert fast.tokens == slow.tokens
    for toks, a, b in zip(fast.tokens, fast.hidden, slow.hidden):
        assert a.shape == b.shape == (len(toks), 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_hidden_states_are_post_norm_latents_of_each_token(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["hello", "3 × 4 = 12, so"])
    out = generate(tiny_model, prompts, max_new_tokens=10, eos_ids=[1], pad_id=0, return_hidden=True)
    head = tiny_model.get_output_embeddings()
    for toks, hid in zip(out.tokens, out.hidden):
        assert hid.shape[0] == len(toks) > 0
        assert head(hid).argmax(-1).tolist() == toks


def test_batched_left_padding_matches_one_by_one(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["short", "a somewhat longer prompt", "mid size"])
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0, return_hidden=True)
    batched = generate(tiny_model, prompts, **kw)
    for i, p in enumerate(prompts):
        single = generate(tiny_model, [p], **kw)
        assert single.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(single.hidden[0], batched.hidden[i], atol=1e-5, rtol=1e-4)


def test_continue_from_prefix_equals_uninterrupted_greedy(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["continue me", "and me too"])
    kw = dict(eos_ids=[1], pad_id=0, return_hidden=True)
    full = generate(tiny_model, prompts, max_new_tokens=10, **kw)
    prefixes = [t[:4] for t in full.tokens]
    cont = generate(tiny_model, prompts, prefixes=prefixes, max_new_tokens=6, **kw)
    assert cont.tokens == full.tokens
    for a, b in zip(cont.hidden, full.hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cont.new_tokens == [len(t) - 4 for t in full.tokens]


def test_stops_at_eos_and_max_new_tokens(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["stop", "go on"])
    probe = generate(tiny_model, prompts, max_new_tokens=5, eos_ids=[1], pad_id=0)
    # declare the first generated token of row 0 an EOS: row 0 ends at once, row 1 runs on
    eos = probe.tokens[0][0]
    out = generate(tiny_model, prompts, max_new_tokens=5, eos_ids=[eos], pad_id=0)
    assert out.tokens[0] == [] and out.finished[0] and out.new_tokens[0] == 1
    assert len(out.tokens[1]) <= 5
    assert eos not in out.tokens[1]


def test_sampling_is_reproducible_per_row_generator(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["sample", "another"])
    def run(order):
        gens = [torch.Generator().manual_seed(s) for s in order]
        ps = [prompts[0], prompts[1]] if order == [7, 8] else [prompts[1], prompts[0]]
        return generate(tiny_model, ps, max_new_tokens=8, eos_ids=[1], pad_id=0, temperature=1.0, generators=gens).tokens
    a = run([7, 8])
    b = run([8, 7])
    assert a[0] == b[1] and a[1] == b[0]
    different = generate(tiny_model, prompts, max_new_tokens=8, eos_ids=[1], pad_id=0, temperature=1.0,
                         generators=[torch.Generator().manual_seed(99), torch.Generator().manual_seed(100)]).tokens
    assert different != a


def test_reused_prompt_state_matches_fresh_prefill(tiny_model, char_tokenizer):
    from lit_latent.kvcache import encode_prompts

    prompts = token_ids(char_tokenizer, ["first prompt", "second, longer prompt", "3rd"])
    kw = dict(eos_ids=[1], pad_id=0, return_hidden=True, max_new_tokens=6)
    state = encode_prompts(tiny_model, prompts, pad_id=0)
    full = generate(tiny_model, prompts, **kw)
    reused = generate(tiny_model, prompts, prompt_state=state, **kw)
    assert reused.tokens == full.tokens
    # prefixes of different lengths (one empty) on a subset of rows, repeated: [p2, p0, p0]
    rows = [2, 0, 0]
    prefixes = [full.tokens[2][:3], [], full.tokens[0][:1]]
    fresh = generate(tiny_model, [prompts[r] for r in rows], prefixes=prefixes, **kw)
    cached = generate(tiny_model, [prompts[r] for r in rows], prefixes=prefixes, prompt_state=state.select(rows), **kw)
    assert cached.tokens == fresh.tokens
    for a, b in zip(cached.hidden, fresh.hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the state is reusable: a second use gives the same again
    again = generate(tiny_model, [prompts[r] for r in rows], prefixes=prefixes, prompt_state=state.select(rows), **kw)
    assert again.tokens == cached.tokens


def test_reserved_cache_layer_matches_a_growing_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from lit_latent.kvcache import ReservedLayer

    torch.manual_seed(0)
    plain = DynamicLayer()
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    plain.update(k, v)
    reserved = ReservedLayer(room=1)  # forces several doublings below
    reserved.update(k.clone(), v.clone())
    for step in range(7):
        k, v = torch.randn(3, 2, 1 + step % 2, 4), torch.randn(3, 2, 1 + step % 2, 4)
        want, got = plain.update(k, v), reserved.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    index = torch.tensor([2, 0])
    plain.batch_select_indices(index)
    reserved.batch_select_indices(index)
    assert reserved.get_seq_length() == plain.get_seq_length() == 15
    assert torch.equal(plain.keys, reserved.keys) and torch.equal(plain.values, reserved.values)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert torch.equal(plain.update(k, v)[0], reserved.update(k, v)[0])
    copied = copy.copy(reserved)  # shares the buffer: writes past its length leave the original intact
    copied.update(torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4))
    assert torch.equal(plain.keys, reserved.keys) and reserved.get_seq_length() == 16


def test_packed_branches_answer_each_branch_as_if_alone(tiny_model, char_tokenizer):
    # two openings, with 3 and 1 branches of different lengths: each branch's greedy
    # continuation and token count must equal a plain generation of opening + branch
    from lit_latent.generation import generate_branches
    from lit_latent.kvcache import encode_prompts

    openings = token_ids(char_tokenizer, ["Problem: 3 + 5. Solution: 8.", "other"])
    branches = [token_ids(char_tokenizer, [" Right?", " Is the answer boxed?", "!"]), token_ids(char_tokenizer, [" ok?"])]
    state = encode_prompts(tiny_model, openings, pad_id=0)
    tokens, counts = generate_branches(tiny_model, state, branches, max_new_tokens=7, eos_ids=[1], pad_id=0)
    assert [len(t) for t in tokens] == [3, 1]
    for opening, row, got, got_counts in zip(openings, branches, tokens, counts):
        for tail, toks, n in zip(row, got, got_counts):
            alone = generate(tiny_model, [opening + tail], max_new_tokens=7, eos_ids=[1], pad_id=0)
            assert toks == alone.tokens[0] and n == alone.new_tokens[0]
            assert len(toks) == 7  # a random model runs to max_new_tokens: every decode step is compared


def test_packed_branches_stop_each_branch_at_its_own_eos(tiny_model, char_tokenizer):
    from lit_latent.generation import generate_branches
    from lit_latent.kvcache import encode_prompts

    openings = token_ids(char_tokenizer, ["stop here", "go"])
    branches = [token_ids(char_tokenizer, [" a", " bb"]), token_ids(char_tokenizer, [" c"])]
    state = encode_prompts(tiny_model, openings, pad_id=0)
    probe, _ = generate_branches(tiny_model, state, branches, max_new_tokens=5, eos_ids=[1], pad_id=0)
    eos = probe[0][0][2]  # branch (0, 0) ends at its third token; the others run on
    tokens, counts = generate_branches(tiny_model, state, branches, max_new_tokens=5, eos_ids=[eos], pad_id=0)
    for g, row in enumerate(branches):
        for k, tail in enumerate(row):
            alone = generate(tiny_model, [openings[g] + tail], max_new_tokens=5, eos_ids=[eos], pad_id=0)
            assert tokens[g][k] == alone.tokens[0] and counts[g][k] == alone.new_tokens[0]
    assert tokens[0][0] == probe[0][0][:2] and counts[0][0] == 3


def test_greedy_tokens_equal_transformers_generate(tiny_model, char_tokenizer):
    # a change in transformers' decoding or masks shows up here first
    prompts = token_ids(char_tokenizer, ["12 + 3 =", "a longer prompt, left-padded"])
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    ref = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                              eos_token_id=1, pad_token_id=0)[:, width:].tolist()
    ref = [row[: row.index(1)] if 1 in row else row for row in ref]
    assert generate(tiny_model, prompts, max_new_tokens=10, eos_ids=[1], pad_id=0).tokens == ref


def test_packed_branches_fall_back_where_4d_masks_are_not_taken(tiny_model, char_tokenizer):
    # a model that refuses ready-made 4D masks (as ALiBi models do) gets the same answers one row per branch
    from lit_latent.generation import generate_branches
    from lit_latent.kvcache import _PROBED, accepts_4d_mask, encode_prompts

    openings = token_ids(char_tokenizer, ["Problem: 3 + 5. Solution: 8.", "other"])
    branches = [token_ids(char_tokenizer, [" Right?", " Is it boxed?"]), token_ids(char_tokenizer, [" ok?"])]
    assert accepts_4d_mask(tiny_model)
    packed = generate_branches(tiny_model, encode_prompts(tiny_model, openings, 0), branches, max_new_tokens=5,
                               eos_ids=[1], pad_id=0)
    tiny_model.__dict__[_PROBED] = False
    try:
        assert generate_branches(tiny_model, encode_prompts(tiny_model, openings, 0), branches, max_new_tokens=5,
                                 eos_ids=[1], pad_id=0) == packed
    finally:
        del tiny_model.__dict__[_PROBED]


def test_models_it_cannot_serve_are_refused_in_one_line(tmp_path, char_tokenizer):
    import pytest
    from transformers import DistilBertConfig, DistilBertModel, T5Config, T5ForConditionalGeneration

    from lit_latent.config import ModelConfig, UserError
    from lit_latent.generation import load_model

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(char_tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                        num_heads=2)).save_pretrained(t5)
    encoder = tmp_path / "encoder"
    DistilBertModel(DistilBertConfig(vocab_size=len(char_tokenizer), dim=16, hidden_dim=32, n_layers=1,
                                     n_heads=2)).save_pretrained(encoder)
    for folder in (t5, encoder):
        char_tokenizer.save_pretrained(folder)
    for path, why in [
        ("Qwen/Qwen2-0.5B", "looks like a Hugging Face hub id"),
        (str(t5), "is an encoder-decoder model (t5)"),
        (str(encoder), "cannot load a causal LM"),
    ]:
        with pytest.raises(UserError, match="config key model.path: ") as err:
            load_model(ModelConfig(path=path))
        assert why in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
    ran_the_directorys_code = True
'''


def test_a_model_with_its_own_code_needs_model_trust_remote_code(tmp_path, char_tokenizer):
    # auto_map in config.json names classes in the directory's own files: refused by default, loaded when trusted
    import json

    import pytest

    from conftest import make_tiny_model
    from lit_latent.config import ModelConfig, UserError
    from lit_latent.generation import load_model

    path = tmp_path / "remote"
    make_tiny_model("llama", len(char_tokenizer)).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    (path / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (path / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))

    with pytest.raises(UserError) as err:
        load_model(ModelConfig(path=str(path)))
    assert str(err.value) == (f"config key model.path: {path} ships its own modelling code (auto_map in config.json: "
                              "AutoConfig, AutoModelForCausalLM), which would run on loading; set "
                              "model.trust_remote_code=true only if you trust that code")
    model, tokenizer = load_model(ModelConfig(path=str(path), trust_remote_code=True))
    assert type(model).__name__ == "TinyRemoteForCausalLM" and model.ran_the_directorys_code
    out = generate(model, [tokenizer("1 + 1 =")["input_ids"]], max_new_tokens=3, eos_ids=[1], pad_id=0)
    assert len(out.tokens[0]) <= 3


def test_prompts_are_prefilled_once_for_their_common_opening_then_in_groups(tiny_model, char_tokenizer):
    from lit_latent import kvcache

    assert kvcache.length_groups([5, 90, 7, 88, 6], cost_per_group=10) == [[0, 4, 2], [3, 1]]
    assert kvcache.length_groups([5, 90, 7], cost_per_group=1000) == [[0, 2, 1]]
    opening = "Solve it step by step. "  # 23 tokens all prompts share
    prompts = token_ids(char_tokenizer, [opening + t for t in ["a short one", "x" * 90 + " a long one", "mid", "y" * 80]])
    rests = [len(p) - len(opening) for p in prompts]
    assert len(kvcache.length_groups(rests, kvcache.PREFILL_GROUP_TOKENS)) == 2
    for shared_opening in (True, False):
        batch = prompts if shared_opening else [p[len(opening) - 3 :] for p in prompts]  # 3 tokens in common: too few
        grouped = kvcache.encode_prompts(tiny_model, batch, pad_id=0)
        padded = kvcache._encode_padded(tiny_model, batch, pad_id=0)
        opened = grouped.mask[:, : len(opening)].all()
        assert bool(opened) == shared_opening and torch.equal(grouped.mask.sum(1), padded.mask.sum(1))
        torch.testing.assert_close(grouped.last, padded.last, atol=1e-5, rtol=1e-4)
        for a, b in zip(grouped.cache.layers, padded.cache.layers):  # the real tokens' keys and values, in order
            torch.testing.assert_close(a.keys.transpose(1, 2)[grouped.mask.bool()], b.keys.transpose(1, 2)[padded.mask.bool()],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values.transpose(1, 2)[grouped.mask.bool()],
                                       b.values.transpose(1, 2)[padded.mask.bool()], atol=1e-5, rtol=1e-4)
        kw = dict(eos_ids=[1], pad_id=0, max_new_tokens=6, return_hidden=True)
        want, got = generate(tiny_model, batch, **kw), generate(tiny_model, batch, prompt_state=grouped, **kw)
        assert got.tokens == want.tokens
        for a, b in zip(got.hidden, want.hidden):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
