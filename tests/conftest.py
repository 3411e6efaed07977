"""Tiny random HF models and a character-level tokenizer, built fresh for the mechanics tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
    chars = list(string.printable) + ["×", "÷"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval().requires_grad_(False)
    return model


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, as prompts for generate."""
    return [tok(t)["input_ids"] for t in texts]


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""The benchmark files (gsm8k, math500, aime24) kept beside the checkout, as configs/data/*.yaml expect."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; the test is skipped, with the reason, when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found: {SHARED_DATA} (the shared data folder beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, char_tokenizer):
    return make_tiny_model(request.param, len(char_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, char_tokenizer):
    """A tiny random Llama saved like any local HF model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model("llama", len(char_tokenizer))
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def write_sum_problems(path: Path, n: int) -> Path:
    """A JSONL file of n problems q0.. "What is i + i?" (answer 2i), as adapt.py reads them."""
    rows = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
