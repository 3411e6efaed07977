"""Drafted decoding (perf.draft_tokens): the greedy answer, fewer forwards."""

import torch

from conftest import token_ids
from lit_latent.drafts import Drafts
from lit_latent.generation import generate
from lit_latent.kvcache import encode_prompts


def test_a_guess_is_what_followed_the_longest_match_latest():
    drafts = Drafts(contexts=[[1, 2, 3]], sources=[[[9, 2, 3, 7, 8], [5, 3, 6, 6, 6, 6]]])
    # last tokens (1, 2, 3): no 3-token match; (2, 3) occurred once, followed by 7 8 and the source's end
    assert drafts.guess(0, length=10) == [7, 8]
    assert drafts.guess(0, length=1) == [7]
    drafts.extend(0, [5, 3])
    # (3, 5, 3) never occurred, (5, 3) did in the second source: 6 6 6 6
    assert drafts.guess(0, length=3) == [6, 6, 6]
    drafts.extend(0, [4])
    assert drafts.guess(0, length=10) == []  # 4 never occurred
    drafts.extend(0, [2, 3])
    # (4, 2, 3) is new, (2, 3) occurred last in the row itself, followed by 5 3 4 2 3
    assert drafts.guess(0, length=3) == [5, 3, 4]


def test_rows_leave_with_their_tables():
    drafts = Drafts(contexts=[[1, 2], [3, 4]], sources=[[[2, 7]], [[4, 8]]])
    drafts.select([1])
    assert drafts.guess(0, length=5) == [8]


def _forwards(model):
    calls = []
    handle = model.base_model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_drafted_answers_are_the_greedy_answers_in_fewer_forwards(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["12 + 3 =", "a much longer prompt here", "x"])
    kw = dict(max_new_tokens=14, eos_ids=[1], pad_id=0, return_hidden=True)
    calls, handle = _forwards(tiny_model)
    plain = generate(tiny_model, prompts, **kw)
    plain_forwards = len(calls)
    calls.clear()
    # perfect drafts (the answers themselves) and misleading ones (another row's answer)
    perfect = generate(tiny_model, prompts, draft_tokens=4, lookup=[[t] for t in plain.tokens], **kw)
    perfect_forwards = len(calls)
    wrong = generate(tiny_model, prompts, draft_tokens=4, lookup=[[plain.tokens[(i + 1) % 3]] for i in range(3)], **kw)
    handle.remove()
    for out in (perfect, wrong):
        assert out.tokens == plain.tokens
        assert out.new_tokens == plain.new_tokens and out.finished == plain.finished
        for a, b in zip(out.hidden, plain.hidden):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a forward per token against up to 5 tokens per forward
    assert 2 * perfect_forwards <= plain_forwards
    head = tiny_model.get_output_embeddings()
    for toks, hid in zip(perfect.tokens, perfect.hidden):
        assert head(hid).argmax(-1).tolist() == toks


def test_drafted_regenerations_stop_where_greedy_stops(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["continue me", "and me too", "third one"])
    state = encode_prompts(tiny_model, prompts, pad_id=0)
    probe = generate(tiny_model, prompts, max_new_tokens=12, eos_ids=[1], pad_id=0)
    # a token inside row 1's continuation ends answers: drafts then carry an end of answer
    eos = probe.tokens[1][6]
    prefixes = [t[:3] for t in probe.tokens]
    for max_new in (2, 9):  # the budget cuts drafts too
        kw = dict(prefixes=prefixes, max_new_tokens=max_new, eos_ids=[eos], pad_id=0, return_hidden=True)
        plain = generate(tiny_model, prompts, prompt_state=state.select([0, 1, 2]), **kw)
        drafted = generate(tiny_model, prompts, prompt_state=state.select([0, 1, 2]), draft_tokens=5,
                           lookup=[[t] for t in probe.tokens], **kw)
        assert drafted.tokens == plain.tokens
        assert drafted.new_tokens == plain.new_tokens and drafted.finished == plain.finished
        assert all(n <= max_new for n in drafted.new_tokens)
        for a, b in zip(drafted.hidden, plain.hidden):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert plain.finished[1] and not all(plain.finished)


def test_sampled_rows_are_not_drafted(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["sample me", "and me"])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0, temperature=1.0)
    calls, handle = _forwards(tiny_model)
    plain = generate(tiny_model, prompts, generators=gens(), **kw)
    plain_forwards = len(calls)
    calls.clear()
    drafted = generate(tiny_model, prompts, generators=gens(), draft_tokens=4, lookup=[[t] for t in plain.tokens], **kw)
    handle.remove()
    assert drafted.tokens == plain.tokens and len(calls) == plain_forwards


def test_a_step_feeds_no_more_tokens_than_the_budget(tiny_model, char_tokenizer):
    prompts = token_ids(char_tokenizer, ["12 + 3 =", "a much longer prompt here", "x"])
    kw = dict(max_new_tokens=10, eos_ids=[1], pad_id=0)
    plain = generate(tiny_model, prompts, **kw)
    fed = []
    handle = tiny_model.base_model.register_forward_hook(lambda m, args, kwargs, out: fed.append(kwargs["input_ids"].numel()),
                                                         with_kwargs=True)
    for budget, most in ((3, 3), (8, 6), (100, 15)):  # 3 rows: 1, 2 or 5 tokens a row
        fed.clear()
        out = generate(tiny_model, prompts, draft_tokens=4, draft_budget=budget, lookup=[[t] for t in plain.tokens], **kw)
        assert out.tokens == plain.tokens
        assert max(fed[1:]) <= most  # after the prefill
    handle.remove()


def test_the_budget_follows_model_size_and_device(tiny_model):
    from lit_latent import drafts

    small = drafts.block_budget(tiny_model, torch.device("cpu"))
    assert small > 40  # a tiny model: a forward is its fixed cost
    big = torch.nn.Linear(20_000, 20_000, bias=False, device="meta")  # 400M parameters: the work per token dominates
    assert drafts.block_budget(big, torch.device("cpu")) == drafts.CPU_TOKENS
    assert drafts.block_budget(big, torch.device("cuda")) == drafts.GPU_TOKENS
