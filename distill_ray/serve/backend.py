"""What the HTTP layer needs from a model backend, and the prompt handling both backends share.

The app speaks only this interface, so the CPU (transformers) and GPU (vLLM) backends are
interchangeable. Prompts cross it as token ids: the app must know the exact prompt length to
reject over-long prompts and to report exact usage, and both backends then see the same ids.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]

# Beyond this a tokenizer's `model_max_length` is a "no limit" sentinel, not a real context.
_SENTINEL_MAX_LENGTH = 1_000_000


class MissingExtraError(ImportError):
    """An optional dependency (an `[extra]` of the package) is not installed."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    # Every token the model produced for this request, including the EOS token or the token
    # that completed a stop sequence: the eval stage prices compute from it, and those cost a
    # forward pass like any other.
    completion_tokens: int
    batch_size: int | None = None  # requests that shared the forward passes; None: unknown
    # Log-probability of the generated tokens under the model, summed: a confidence signal
    # for deployments composed in front of the student (NesyCD's retrieval gate). None: unknown.
    logprob: float | None = None

    @property
    def confidence(self) -> float | None:
        """Geometric-mean probability of the generated tokens, in (0, 1]."""
        if self.logprob is None or self.completion_tokens == 0:
            return None
        return math.exp(self.logprob / self.completion_tokens)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served name clients put in `model`
    source: str  # where the weights came from (a directory or hub id)
    context_length: int  # prompt + completion tokens the model accepts
    has_chat_template: bool


class Backend(Protocol):
    def model_info(self) -> ModelInfo: ...

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        """Token ids for a raw prompt (a string) or a chat (a list of role/content dicts)."""
        ...

    async def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        """One completion per prompt, in order; prompts may carry different params."""
        ...


def render_chat(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """The chat as prompt text, and whether the tokenizer must still add its special tokens.

    A student trained from scratch has no chat template: it was trained on raw text, so the
    messages' contents are its prompt. A chat template already places BOS and friends itself.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text, False
    return "\n".join(m["content"] for m in messages), True


def encode_prompt(tokenizer, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    if isinstance(prompt, str):
        text, add_special = prompt, True
    else:
        text, add_special = render_chat(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def context_length(model_config, tokenizer, override: int | None = None) -> int:
    if override:
        return int(override)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _SENTINEL_MAX_LENGTH:
        return limit
    raise ValueError("cannot tell the model's context length: its config has no max_position_embeddings")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """All ids that end a completion: the tokenizer's EOS and the generation config's list."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
