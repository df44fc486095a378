"""FLOPs per example: closed forms equal the token-by-token sum, and N_mm matches the module tree."""
from __future__ import annotations

from transformers import LlamaConfig, Qwen2Config

from distill_ray.evaluate.flops import flops_model_from_config


def _llama(**kw) -> LlamaConfig:
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


def test_matmul_params_count_every_projection_and_the_tied_head():
    fm = flops_model_from_config(_llama())
    d, ff, v, layers, kv_dim = 64, 128, 300, 3, 2 * 16
    per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * ff  # q, k, v, o, gate/up/down
    assert fm.matmul_params == layers * per_layer + v * d  # + LM head even when tied
    assert fm.num_layers == 3 and fm.attn_dim == 64


def test_prefill_and_decode_equal_the_per_token_sum():
    fm = flops_model_from_config(_llama())
    p, g = 37, 11
    assert fm.prefill(p) == sum(fm.token(i) for i in range(1, p + 1))
    assert fm.decode(p, g) == sum(fm.token(p + j) for j in range(1, g + 1))
    ex = fm.example(p, g)
    assert ex["flops_total"] == ex["flops_prefill"] + ex["flops_decode"]
    assert fm.decode(p, 0) == 0


def test_longer_prompts_cost_more_than_linearly_and_other_architectures_work():
    fm = flops_model_from_config(Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, intermediate_size=96))
    assert fm.prefill(200) > 2 * fm.prefill(100)
    assert fm.example(100, 50)["flops_total"] > fm.example(100, 10)["flops_total"]
