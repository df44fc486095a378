"""What we ask an OpenAI-compatible model, and what comes back.

`LLMRequest.key()` is the cache key: a hash of everything that determines the reply and
nothing that does not (endpoint address, API key, timeouts), so the same question asked
of the same model with the same sampling settings is answered once, wherever it runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

RequestKind = Literal["chat", "completion"]


@dataclass(frozen=True)
class LLMRequest:
    kind: RequestKind
    model: str
    messages: tuple[dict[str, str], ...] | None = None  # chat: ({"role": ..., "content": ...}, ...)
    prompt: str | None = None  # completion
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "chat":
            if not self.messages or self.prompt is not None:
                raise ValueError("LLMRequest: a chat request needs messages and no prompt")
            for m in self.messages:
                ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                if not ok:
                    raise ValueError(f"LLMRequest: each message needs string 'role' and 'content', got {m!r}")
        elif self.kind == "completion":
            if self.prompt is None or self.messages is not None:
                raise ValueError("LLMRequest: a completion request needs a prompt and no messages")
        else:
            raise ValueError(f"LLMRequest: kind must be 'chat' or 'completion', got {self.kind!r}")
        if not self.model:
            raise ValueError("LLMRequest: model must be non-empty")
        if self.max_tokens < 1:
            raise ValueError(f"LLMRequest: max_tokens must be >= 1, got {self.max_tokens}")

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal requests give equal text."""
        return self._canonical

    @cached_property
    def _canonical(self) -> str:
        # Computed once per request: the key, the cache record and the log all need it.
        d = asdict(self)
        d["messages"] = [dict(m) for m in self.messages] if self.messages is not None else None
        d["stop"] = list(self.stop) if self.stop is not None else None
        # Normalise -0.0 / 1 vs 1.0 so numerically equal settings hash alike.
        d["temperature"] = float(self.temperature)
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "LLMRequest":
        d = json.loads(text)
        return cls(
            kind=d["kind"],
            model=d["model"],
            messages=tuple(d["messages"]) if d.get("messages") is not None else None,
            prompt=d.get("prompt"),
            temperature=d.get("temperature", 0.0),
            max_tokens=d.get("max_tokens", 256),
            stop=tuple(d["stop"]) if d.get("stop") is not None else None,
            seed=d.get("seed"),
        )

    def key(self) -> str:
        return self._key

    @cached_property
    def _key(self) -> str:
        return hashlib.sha256(self._canonical.encode("utf-8")).hexdigest()

    def last_user_text(self) -> str:
        if self.kind == "completion":
            return self.prompt or ""
        users = [m["content"] for m in self.messages or () if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class LLMResponse:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    cached: bool = False
    retries: int = field(default=0, compare=False)  # transport retries the client made for this reply
    malformed: int = field(default=0, compare=False)  # replies re-asked because their body was malformed
    # (model, prompt tokens, completion tokens) of each model call behind this reply, when
    # the endpoint reports them (`usage.calls`: a composed endpoint such as Socratic CoT's
    # dialogue); empty: one call, the totals above.
    call_usage: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)
