"""Build the student: a Hugging Face causal LM from a path, or a tiny one from a config.

The tiny path exists so the embedded default (and every test) runs with no model hub:
a byte-level BPE tokenizer is trained on the run's own text in well under a second and a
small Llama is initialised from scratch. Both are saved with `save_pretrained`, so every
later stage (Serve, vLLM, eval) loads them exactly like a hub model.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass(frozen=True)
class TinySpec:
    """Shape of a from-scratch student (CALIBRATION.md: ~1 M params fits a few CPU minutes)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512
    vocab_size: int = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with one token per digit, so arithmetic is learnable digit by digit."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_model(tokenizer: PreTrainedTokenizerFast, spec: TinySpec, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    # Through from_config, not the constructor: under a live ZeRO-3 HfDeepSpeedConfig it
    # builds the model already sharded (deepspeed.zero.Init), elsewhere it is the same.
    return AutoModelForCausalLM.from_config(config)


def load_pretrained(path: str, dtype: torch.dtype | None = None):
    """A saved student or a hub/local HF model; returns (model, tokenizer) with a pad token set."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForCausalLM.from_pretrained(path)
    return model, tokenizer
