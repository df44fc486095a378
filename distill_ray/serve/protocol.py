"""The OpenAI-compatible wire format: request and response bodies, and the error shape.

Requests ignore fields we do not know (clients send many optional ones), but a known field
whose value would change the answer in a way we cannot honour (n > 1, logprobs, penalties,
streaming) is refused with a reason rather than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """A request we answer with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        # Keyword-only arguments: the default pickling would lose them, and an ApiError raised
        # in a replica must reach a composed deployment's handle call intact.
        return _api_error, (self.status, self.message, self.type, self.param, self.code)


def _api_error(status: int, message: str, type: str, param: str | None, code: str | None) -> ApiError:
    return ApiError(status, message, type=type, param=param, code=code)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; eval passes 0 explicitly
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        return items

    def stop_sequences(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(param, reason) for the first option this server cannot honour, or None."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported: this server returns exactly one choice (n=1)"
        if self.stream:
            return "stream", "stream=true is not supported: send stream=false and read the whole response"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence_penalty and frequency_penalty are not supported (leave them at 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        # The content-parts form carries only text for a text model; join it.
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
                raise ValueError("content parts must all be {'type': 'text', 'text': str}")
            return "".join(p["text"] for p in value)
        if value is None:
            return ""
        return value


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tool calling is not supported"
        return super().unsupported()


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            return value
        raise ValueError("prompt must be a string or a non-empty list of strings (token-id prompts are not supported)")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.echo:
            return "echo", "echo=true is not supported"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of={self.best_of} is not supported (only 1)"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()


def parse_request(model: type[_Request], body: bytes) -> Any:
    """Validate a raw body; any problem becomes a 400 naming the field and what is wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type":
            raise ApiError(400, "request body must be a JSON object") from None
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            what = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {what}" if where else what)
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, "; ".join(problems), param=param) from None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "distill-ray"
    max_model_len: int  # vLLM's name for it; clients use it to size prompts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for an option this server cannot honour (a silent drop would change the answer)."""
    problem = req.unsupported()
    if problem:
        param, reason = problem
        raise ApiError(400, reason, param=param, code="unsupported_parameter")


def summed_usage(counts: Any) -> Usage:
    """One reply's usage: (prompt, completion) tokens summed over every model call behind it."""
    pairs = list(counts)
    prompt, completion = sum(p for p, _ in pairs), sum(c for _, c in pairs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_response(model: str, outputs: Any, usage: Usage) -> CompletionResponse:
    """`outputs`: (text, finish_reason) per prompt, in prompt order."""
    choices = [CompletionChoice(index=i, text=text, finish_reason=finish) for i, (text, finish) in enumerate(outputs)]
    return CompletionResponse(model=model, choices=choices, usage=usage)


def chat_response(model: str, text: str, finish_reason: str, usage: Usage) -> ChatCompletionResponse:
    choice = ChatChoice(index=0, message=ChatMessageOut(content=text), finish_reason=finish_reason)
    return ChatCompletionResponse(model=model, choices=[choice], usage=usage)
