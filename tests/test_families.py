"""Parity matrix: tiny random models of many causal-LM families against their own forward and
``model.generate``. Per family: (a) greedy tokens equal ``model.generate``, with and without a
prompt cache; (b) the log-probs the framework samples from and the latent policy's equal
``log_softmax(model(...).logits / T)``; (c) CoT, LatentSeek and LatentEvolve run through
``adapt.main``. The families behind ``slow`` run (c) only with ``-m slow``.
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
    }


FAMILIES = list(_configs(100))
# (c) in the default run for these; the others behind the slow marker
DEFAULT_RUNS = {"llama", "bloom", "gemma2", "cohere", "granite", "opt_project_out"}

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


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_model_generate(family, char_tokenizer):
    from lit_latent.kvcache import encode_prompts

    model = family_model(family, len(char_tokenizer))
    prompts = [char_tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _hf_greedy(model, prompts, 8)
    kw = dict(max_new_tokens=8, eos_ids=[1], pad_id=0)
    assert generate(model, prompts, **kw).tokens == want
    assert generate(model, prompts, prompt_state=encode_prompts(model, prompts, 0), **kw).tokens == want
    assert generate(model, prompts, use_cache=False, **kw).tokens == want
