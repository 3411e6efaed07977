"""Large linear layers on CPU through oneDNN with packed weights (perf.pack_weights)."""

import pytest
import torch
from torch import nn

from lit_latent.generation import generate
from lit_latent.packed_linear import PackedLinear, pack_linear_weights
from conftest import make_tiny_model, token_ids

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def test_packed_layers_give_the_same_answers_and_states(char_tokenizer):
    plain = make_tiny_model("llama", len(char_tokenizer))
    packed = make_tiny_model("llama", len(char_tokenizer))
    packed.load_state_dict(plain.state_dict())
    assert pack_linear_weights(packed, min_weight=1) == sum(
        type(m) is nn.Linear for m in plain.modules()) - 1  # all but the head
    assert type(packed.get_output_embeddings()) is nn.Linear
    assert pack_linear_weights(packed, min_weight=1) == 0  # packed ones are no longer nn.Linear
    prompts = token_ids(char_tokenizer, ["12 + 3 =", "a much longer prompt here"])
    kw = dict(max_new_tokens=10, eos_ids=[1], pad_id=0, return_hidden=True)
    want, got = generate(plain, prompts, **kw), generate(packed, prompts, **kw)
    assert got.tokens == want.tokens
    for a, b in zip(got.hidden, want.hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_small_layers_stay_and_gradients_still_flow(char_tokenizer):
    model = make_tiny_model("llama", len(char_tokenizer))
    assert pack_linear_weights(model) == 0  # the tiny model's weights are all under MIN_WEIGHT
    layer = nn.Linear(8, 4)
    layer.weight.requires_grad_(False)
    holder = nn.Module()
    holder.layer = layer
    holder.get_output_embeddings = lambda: None
    assert pack_linear_weights(holder, min_weight=1) == 1 and type(layer) is PackedLinear
    x = torch.randn(3, 8, requires_grad=True)  # e.g. LTPO's thoughts: F.linear, differentiable
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(3, 8))
    with torch.no_grad():
        torch.testing.assert_close(layer(x.detach()), nn.functional.linear(x.detach(), layer.weight, layer.bias))


def test_the_module_packs_large_layers_on_cpu_unless_told_not_to(char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_latent.config import AdaptConfig, PerfConfig
    from lit_latent.module import LatentAdaptationModule

    def big_mlp_model():  # one layer whose MLP matrices hold 2^19 weights each
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=256, intermediate_size=2048,
                                            num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=False)).eval()

    for pack, want in ((True, 3), (False, 0)):
        model = big_mlp_model()
        module = LatentAdaptationModule(model, char_tokenizer, AdaptConfig(method="cot", perf=PerfConfig(pack_weights=pack)))
        module.on_predict_start()
        assert sum(type(m) is PackedLinear for m in model.modules()) == want


def test_nothing_is_packed_where_the_copies_would_not_fit(char_tokenizer, monkeypatch):
    from lit_latent import packed_linear

    model = make_tiny_model("llama", len(char_tokenizer))
    monkeypatch.setattr(packed_linear, "_physical_memory", lambda: 4 * 1024)  # 4 KiB: a quarter holds no layer
    assert pack_linear_weights(model, min_weight=1) == 0
    assert not any(type(m) is PackedLinear for m in model.modules())
