"""Inference FLOPs from a model config: prefill and decode, per example.

Per generated or prompt token at context length c the forward pass costs
2·N_mm (every matmul weight used once, multiply + add) + 4·L·c·d_attn (QKᵀ and A·V
over the c cached positions). N_mm is counted on the meta device from the real module
tree, so any architecture transformers can build is handled, and a tied LM head still
counts (the projection runs even when its weights are shared with the embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


@dataclass(frozen=True)
class FlopsModel:
    matmul_params: int  # N_mm
    num_layers: int
    attn_dim: int  # heads × head_dim: the width of QKᵀ and A·V

    def token(self, context: int) -> float:
        return 2.0 * self.matmul_params + 4.0 * self.num_layers * context * self.attn_dim

    def prefill(self, prompt_tokens: int) -> float:
        # Σ_{i=1..P} token(i), in closed form.
        p = prompt_tokens
        return 2.0 * self.matmul_params * p + 4.0 * self.num_layers * self.attn_dim * p * (p + 1) / 2

    def decode(self, prompt_tokens: int, generated_tokens: int) -> float:
        # Token j of the reply attends over the prompt and the j tokens before it (KV cache).
        p, g = prompt_tokens, generated_tokens
        return 2.0 * self.matmul_params * g + 4.0 * self.num_layers * self.attn_dim * (g * p + g * (g + 1) / 2)

    def example(self, prompt_tokens: int, generated_tokens: int) -> dict[str, float]:
        pre, dec = self.prefill(prompt_tokens), self.decode(prompt_tokens, generated_tokens)
        return {"flops_prefill": pre, "flops_decode": dec, "flops_total": pre + dec}


def flops_model_from_config(config: PretrainedConfig) -> FlopsModel:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return FlopsModel(matmul_params=matmul, num_layers=text.num_hidden_layers, attn_dim=heads * head_dim)


@lru_cache(maxsize=16)
def flops_model(model_dir: str) -> FlopsModel:
    """FlopsModel of a saved student (a Hugging Face model dir with its config.json)."""
    return flops_model_from_config(AutoConfig.from_pretrained(model_dir))
