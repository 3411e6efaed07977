"""Parity matrix: tiny random models of many causal-LM families against their own forward and
``model.generate``. Per family: (a) greedy tokens equal ``model.generate``, with and without a
prompt cache; (b) the log-probs the framework samples from and the latent policy's equal
``log_softmax(model(...).logits / T)``; (c) CoT, LatentSeek and LatentEvolve run through
``adapt.main``. The families behind ``slow`` run (c) only with ``-m slow``.

Recurrent and hybrid families (Mamba, Mamba-2, Jamba, LFM2, Falcon-H1, RecurrentGemma, Granite 4's
GraniteMoeHybrid, Qwen3-Next, Bamba) keep states the KV fast path cannot hold; they are decoded with transformers' own cache, their
prompts re-run (``rerun.py``). Mamba and LFM2 run (a)-(c) in the default run, the others
only with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lit_latent.generation as generation
from lit_latent.generation import generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _configs(vocab: int) -> dict:
    import transformers as tf

    ids = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return {
        "llama": lambda: tf.LlamaConfig(**SMALL, **ids),
        "qwen2": lambda: tf.Qwen2Config(**SMALL, **ids),
        "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=8, **ids),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**SMALL, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, **ids),
        # a window shorter than the prompts, so the sliding layers matter
        "mistral": lambda: tf.MistralConfig(**SMALL, sliding_window=6, **ids),
        "gemma": lambda: tf.GemmaConfig(**SMALL, head_dim=8, **ids),
        # softcap 1.0: small enough to change the random model's distribution visibly (30 in Gemma 2 itself)
        "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=1.0, sliding_window=6, **ids),
        "gemma3": lambda: tf.Gemma3TextConfig(**SMALL, head_dim=8, final_logit_softcapping=1.0, sliding_window=6, **ids),
        "phi": lambda: tf.PhiConfig(**SMALL, **ids),
        "phi3": lambda: tf.Phi3Config(**SMALL, **ids),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, **ids),
        "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4, **ids),
        # opt-350m's shape: hidden 64 projected to 32 before the head
        "opt_project_out": lambda: tf.OPTConfig(hidden_size=64, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=256,
                                                do_layer_norm_before=False, **ids),
        "falcon_alibi": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                                                **ids),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids),
        "mpt": lambda: tf.MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, expansion_ratio=2, **ids),
        "stablelm": lambda: tf.StableLmConfig(**SMALL, **ids),
        "olmo": lambda: tf.OlmoConfig(**SMALL, **ids),
        "olmo2": lambda: tf.Olmo2Config(**SMALL, **ids),
        # logits divided by 8 (granite-3's value)
        "granite": lambda: tf.GraniteConfig(**SMALL, logits_scaling=8.0, **ids),
        # logits times 1/16 (Cohere's own default)
        "cohere": lambda: tf.CohereConfig(**SMALL, logit_scale=0.0625, **ids),
        "cohere2": lambda: tf.Cohere2Config(**SMALL, logit_scale=0.0625, sliding_window=6, **ids),
        "smollm3": lambda: tf.SmolLM3Config(**SMALL, **ids),
        # recurrent and hybrid: states the KV fast path cannot hold (rerun.py decodes them)
        "mamba": lambda: tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4, **ids),
        "mamba2": lambda: tf.Mamba2Config(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                                          num_heads=8, head_dim=8, n_groups=1, chunk_size=16, **ids),
        # layer 0 Mamba, layer 1 attention with a 2-expert MoE
        "jamba": lambda: tf.JambaConfig(**SMALL, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                        expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=4,
                                        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, **ids),
        # a short-convolution layer, then attention
        "lfm2": lambda: tf.Lfm2Config(**SMALL, layer_types=["conv", "full_attention"], conv_L_cache=3, **ids),
        # attention and Mamba-2 side by side in every layer
        "falcon_h1": lambda: tf.FalconH1Config(**SMALL, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                               mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                               mamba_chunk_size=16, **ids),
        # a linear recurrence (RG-LRU) layer, a local-attention layer; logits softcapped by logits_soft_cap
        "recurrent_gemma": lambda: tf.RecurrentGemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                           lru_width=32, attention_window_size=16, conv1d_width=4,
                                                           logits_soft_cap=1.0, block_types=["recurrent", "attention"],
                                                           **ids),
        # the hybrid releases built on the same layers: Granite 4 (Mamba-2 + attention, MoE), Qwen3-Next (gated
        # DeltaNet + attention, MoE), Bamba (Mamba-2 + attention)
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(**SMALL, layer_types=["mamba", "attention"], mamba_n_heads=4,
                                                              mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                                                              mamba_expand=2, mamba_chunk_size=16, num_local_experts=2,
                                                              num_experts_per_tok=1, shared_intermediate_size=32, **ids),
        "qwen3_next": lambda: tf.Qwen3NextConfig(**SMALL, head_dim=8, layer_types=["linear_attention", "full_attention"],
                                                 linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                                 linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
                                                 shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                                                 **ids),
        "bamba": lambda: tf.BambaConfig(**SMALL, attn_layer_indices=[1], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
                                        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, **ids),
    }


FAMILIES = list(_configs(100))
RECURRENT = ["mamba", "mamba2", "jamba", "lfm2", "falcon_h1", "recurrent_gemma", "granitemoehybrid", "qwen3_next", "bamba"]
# (c) in the default run for these; the others behind the slow marker
DEFAULT_RUNS = {"llama", "bloom", "gemma2", "cohere", "granite", "opt_project_out", "mamba", "lfm2"}
# (a) and (b) in the default run for every attention family and these recurrent ones
DEFAULT_RECURRENT = {"mamba", "lfm2"}
FAMILY_PARAMS = [pytest.param(f, marks=[pytest.mark.slow] if f in RECURRENT and f not in DEFAULT_RECURRENT else [])
                 for f in FAMILIES]

_built: dict = {}


def family_model(name: str, vocab: int):
    """The tiny seeded model of a family (built once per session)."""
    if name not in _built:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = _configs(vocab)[name]()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval().requires_grad_(False)
        _built[name] = model
    return _built[name]


PROMPTS = ["What is 3 + 4?", "Sum 12 and 30, then halve it."]


def _hf_greedy(model, prompts, max_new_tokens):
    """model.generate's greedy answer per prompt (EOS and what follows removed), batched with left padding."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=1, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(1)] if 1 in row else row)
    return rows


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_greedy_tokens_equal_model_generate(family, char_tokenizer):
    from lit_latent.kvcache import encode_prompts

    model = family_model(family, len(char_tokenizer))
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _hf_greedy(model, prompts, 8)
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0)
    assert generate(model, prompts, **kw).tokens == want
    assert generate(model, prompts, prompt_state=encode_prompts(model, prompts, 0), **kw).tokens == want
    assert generate(model, prompts, use_cache=False, **kw).tokens == want


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_greedy_tokens_after_prompt_embeddings_equal_model_generate(family, char_tokenizer):
    # LTPO answers after prompts given as embeddings: through the prompt cache where it is held,
    # re-running the embeddings every step where it is not; both must decode as the model does
    from lit_latent.kvcache import _left_pad, encode_prompt_embeddings, holds_kv_cache
    from lit_latent.rerun import generate_from_embeddings

    model = family_model(family, len(char_tokenizer))
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _hf_greedy(model, prompts, 8)
    ids, mask = _left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0)
    assert generate_from_embeddings(model, embeds, mask, **kw).tokens == want
    if holds_kv_cache(model):
        assert generate(model, [[] for _ in prompts], prompt_state=encode_prompt_embeddings(model, embeds, mask), **kw).tokens == want


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_sampling_draws_from_the_models_distribution(family, char_tokenizer, monkeypatch):
    # every step's logits handed to the sampler, against the model's own forward over the same tokens
    model = family_model(family, len(char_tokenizer))
    seen = []
    pick = generation._pick
    monkeypatch.setattr(generation, "_pick", lambda logits, *a: seen.append(logits.clone()) or pick(logits, *a))
    T = 0.7
    for text in PROMPTS:
        prompt = char_tokenizer(text)["input_ids"]
        seen.clear()
        out = generate(model, [prompt], max_new_tokens=5, eos_ids=[1], pad_id=0, temperature=T,
                       generators=[torch.Generator().manual_seed(0)])
        ref = model(input_ids=torch.tensor([prompt + out.tokens[0]])).logits[0].float()
        assert 0 < len(seen) <= len(out.tokens[0]) + 1
        for j, logits in enumerate(seen):
            torch.testing.assert_close(torch.log_softmax(logits[0] / T, -1), torch.log_softmax(ref[len(prompt) - 1 + j] / T, -1),
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_latent_policy_is_the_models_distribution(family, char_tokenizer):
    # the latents generate returns, through LogitHead, give the model's log-probs of the tokens they
    # produced: on a fresh prefill and after a forced prefix on a cached prompt
    from lit_latent.heads import LogitHead, latent_size
    from lit_latent.kvcache import encode_prompts
    from lit_latent.latents import token_log_probs

    model = family_model(family, len(char_tokenizer))
    head = LogitHead(model)
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    kw = dict(max_new_tokens=6, eos_ids=[1], pad_id=0, return_hidden=True)
    first = generate(model, prompts, **kw)
    again = generate(model, prompts, prefixes=[t[:2] for t in first.tokens], prompt_state=encode_prompts(model, prompts, 0), **kw)
    T = 0.7
    for out in (first, again):
        for prompt, tokens, hidden in zip(prompts, out.tokens, out.hidden):
            assert hidden.shape == (len(tokens), latent_size(model))
            ref = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
            want = torch.log_softmax(ref / T, -1)
            torch.testing.assert_close(torch.log_softmax(head(hidden).float() / T, -1), want, atol=1e-4, rtol=1e-4)
            got = token_log_probs(head, hidden, torch.tensor(tokens), T)
            torch.testing.assert_close(got, want.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def two_problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "two.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in (1, 2)))
    return path


def _family_dir(family, tokenizer, root: Path) -> Path:
    path = root / family
    if not path.is_dir():
        model = family_model(family, len(tokenizer))
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


RUNS = {
    "cot": ["--config", str(ROOT / "configs" / "cot.yaml")],
    "latentseek": ["--config", str(ROOT / "configs" / "latentseek.yaml"), "reward.kind=verifier", "latent.max_iterations=2"],
    # one problem a batch, so the second retrieves the first; tau 0 archives both, and the night after them trains a weaver
    # self-reward: the model answers its verification questions, packed after a shared opening
    # where the model takes 4D masks, one row per question where it does not (ALiBi)
    "latentseek_self": ["--config", str(ROOT / "configs" / "latentseek.yaml"), "reward.kind=self", "reward.scheme=latentseek",
                        "latent.max_iterations=1"],
    "latentevolve": ["--config", str(ROOT / "configs" / "latentevolve.yaml"), "reward.kind=verifier", "evolve.samples=2",
                     "evolve.max_steps=2", "evolve.latent_count=3", "evolve.archive_threshold=0.0", "evolve.night_every=2",
                     "data.batch_size=1", "weaver.max_epochs=1"],
    # thought embeddings in the prompt (inputs_embeds), then an answer generated after them through the cache
    "ltpo": ["--config", str(ROOT / "configs" / "ltpo.yaml"), "ltpo.steps=2", "ltpo.thoughts=3",
             "data.max_prompt_tokens=200"],  # the char tokenizer's prompt would pass GPT-2's 256 positions
}
# LTPO in the default run for the matrix (Llama, Qwen2, Gemma 2, GPT-2, OPT's project_out)
LTPO_DEFAULT_RUNS = {"llama", "qwen2", "gemma2", "gpt2", "opt_project_out"}


def _run_cases():
    for family in FAMILIES:
        for method in RUNS:
            default = family in (LTPO_DEFAULT_RUNS if method == "ltpo" else DEFAULT_RUNS)
            marks = [] if default else [pytest.mark.slow]
            # self-reward also through the recurrent path: verification re-runs each message whole
            if method == "latentseek_self" and family not in ("bloom", "falcon_alibi", "llama", "mamba", "jamba"):
                continue
            if family in RECURRENT and method in ("latentseek_self", "latentevolve"):
                marks = [pytest.mark.slow]
            yield pytest.param(family, method, marks=marks, id=f"{family}-{method}")


@pytest.mark.parametrize("family, method", list(_run_cases()))
def test_methods_run_end_to_end(family, method, char_tokenizer, two_problems, tmp_path_factory):
    import adapt
    from lit_latent.results import read_records

    model_dir = _family_dir(family, char_tokenizer, tmp_path_factory.getbasetemp() / "families")
    run_dir = tmp_path_factory.mktemp(f"{family}-{method}")
    adapt.main([*RUNS[method], f"model.path={model_dir}", f"data.path={two_problems}", f"run_dir={run_dir}",
                "generation.max_new_tokens=8", "trainer.accelerator=cpu"])
    records = read_records(run_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == ["p1", "p2"]
    if method == "ltpo":
        assert [r["iterations"] for r in records] == [2, 2]
    if method == "latentevolve":
        assert (run_dir / "weaver" / "night-001" / "weaver.json").is_file()
        assert records[1].get("neighbours") == ["p1"]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_the_decoding_path_is_probed_per_family(family, char_tokenizer):
    # keys and values: the fast path; recurrent or convolution states: transformers' own cache, prompts re-run
    from lit_latent.rerun import decoding_path

    model = family_model(family, len(char_tokenizer))
    assert decoding_path(model) == ("own cache" if family in RECURRENT else "kv cache")


def test_a_model_whose_own_cache_does_not_reproduce_its_forward_recomputes_every_step(char_tokenizer, monkeypatch):
    # the last resort: no cache at all, the whole sequence at every step (as the reference profile)
    import lit_latent.rerun as rerun
    from lit_latent.kvcache import encode_prompts

    model = family_model("mamba", len(char_tokenizer))
    monkeypatch.setitem(model.__dict__, rerun._PROBED, False)
    monkeypatch.setattr(rerun, "_decode_with_own_cache", lambda *a, **k: pytest.fail("the own-cache path was used"))
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0)
    assert generate(model, prompts, prompt_state=encode_prompts(model, prompts, 0), **kw).tokens == _hf_greedy(model, prompts, 8)


def test_recurrent_gemmas_logits_are_its_head_softcapped_by_logits_soft_cap(char_tokenizer):
    # RecurrentGemma's forward: tanh(lm_head(h) / logits_soft_cap) * logits_soft_cap (1.0 here, 30 in its releases)
    from lit_latent.heads import LogitTransform, logit_transform

    model = family_model("recurrent_gemma", len(char_tokenizer))
    assert logit_transform(model) == LogitTransform(softcap=1.0)


def test_latents_are_sized_by_the_heads_input_where_opt_projects_out(char_tokenizer):
    # opt-350m's shape: the memory and weaver take latents of lm_head's input size, not config.hidden_size
    from lit_latent.config import WeaverConfig
    from lit_latent.heads import latent_size
    from lit_latent.kvcache import encode_prompts
    from lit_latent.memory import EpisodicMemory
    from lit_latent.weaver import build_weaver

    model = family_model("opt_project_out", len(char_tokenizer))
    assert (model.config.hidden_size, latent_size(model)) == (64, 32)
    prompt = [char_tokenizer(PROMPTS[0])["input_ids"]]
    e = encode_prompts(model, prompt, 0).last
    z = generate(model, prompt, max_new_tokens=4, eos_ids=[1], pad_id=0, return_hidden=True).hidden[0][None, :3]
    memory = EpisodicMemory(None, "opt", latent_size(model))
    memory.add(e, z, z, [1.0], ["p"])
    assert memory.search(e, k=1)[0].z_star.shape == (1, 3, 32)
    weaver = build_weaver(WeaverConfig(layers=1, heads=2), latent_size(model), e.shape[-1], 3)
    assert weaver(e, z).shape == z.shape


@pytest.mark.parametrize("family, packs", [("llama", True), ("gpt2", True), ("mpt", True), ("bloom", False), ("falcon_alibi", False)])
def test_packed_branches_where_4d_masks_are_taken_and_the_same_answers_where_not(family, packs, char_tokenizer):
    from lit_latent.generation import generate_branches
    from lit_latent.kvcache import accepts_4d_mask, encode_prompts

    model = family_model(family, len(char_tokenizer))
    assert accepts_4d_mask(model) is packs
    openings = [char_tokenizer(t)["input_ids"] for t in ("Problem: 3 + 5. Solution: 8.", "other")]
    branches = [[char_tokenizer(t)["input_ids"] for t in (" Right?", " Boxed?")], [char_tokenizer(" ok?")["input_ids"]]]
    tokens, counts = generate_branches(model, encode_prompts(model, openings, 0), branches, max_new_tokens=5, eos_ids=[1], pad_id=0)
    for opening, row, got, got_counts in zip(openings, branches, tokens, counts):
        for tail, toks, n in zip(row, got, got_counts):
            alone = generate(model, [opening + tail], max_new_tokens=5, eos_ids=[1], pad_id=0)
            assert (toks, n) == (alone.tokens[0], alone.new_tokens[0])
