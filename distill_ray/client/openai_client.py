"""Sending one `LLMRequest` through the stock `openai` async client.

Transport failures (429, 5xx, timeouts, dropped connections) are retried by the client's
own machinery: exponential backoff with jitter, honouring Retry-After. We take the
raw response (the client's documented `client.post(..., cast_to=httpx2.Response)` route)
and parse the body ourselves, so a 200 whose body is not a completion is caught here as
`malformed` and re-sent within a bounded budget instead of surfacing later as an
AttributeError deep in a pydantic model. Every HTTP attempt passes through a request
hook, which counts it for the call in progress (a context variable: the hook runs in
the calling task) and waits on the rate limiter.

Error messages are built from status codes and exception class names only: a server
may echo request headers (the API key) in its error body, so bodies never reach them.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx2  # the openai client's own HTTP layer (a dependency of openai 3.x)
import openai

from distill_ray.client.requests import LLMRequest, LLMResponse


@dataclass
class _Tally:
    sent: int = 0  # HTTP requests made for the current send(), client retries included


_TALLY: contextvars.ContextVar[_Tally | None] = contextvars.ContextVar("distill_ray_http_tally", default=None)


class LLMCallError(Exception):
    """A call that failed after every retry; `status` is one short word for stats and rows."""

    def __init__(self, status: str, message: str, *, retries: int = 0, malformed: int = 0) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.retries = retries
        self.malformed = malformed


@dataclass(frozen=True)
class Secret:
    """Carries the API key to workers; its repr never shows the value (Ray prints args on errors)."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class ClientSettings:
    """Everything a worker needs to build its client; picklable, key kept behind `Secret`."""

    base_url: str
    api_key: Secret
    max_retries: int = 4
    timeout_s: float = 20.0
    max_connections: int = 1000


def make_client(
    settings: ClientSettings,
    before_send: Callable[[], Awaitable[None]] | None = None,
) -> openai.AsyncOpenAI:
    """An AsyncOpenAI on the aiohttp transport (cheaper per request than httpx's own).

    `before_send` runs before every HTTP request, transport retries included, which is
    where a rate limiter belongs: a retried request costs the endpoint as much as a new one.
    """

    async def _on_request(_request) -> None:
        tally = _TALLY.get()
        if tally is not None:
            tally.sent += 1
        if before_send is not None:
            await before_send()

    http_client = openai.DefaultAioHttpClient(
        limits=httpx2.Limits(
            max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections
        ),
        event_hooks={"request": [_on_request]},
    )
    return openai.AsyncOpenAI(
        base_url=settings.base_url,
        api_key=settings.api_key.value,
        max_retries=settings.max_retries,
        timeout=settings.timeout_s,
        http_client=http_client,
    )


def _refused(exc: BaseException) -> bool:
    """Whether an OS-level connection failure (refused, reset, unresolvable) caused `exc`.

    The aiohttp transport reports a refused connection as a connect *timeout*, so the
    cause chain, not the exception class, tells a dead endpoint from a slow one.
    """
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def classify(exc: BaseException) -> str:
    """One short status for an exception raised by the openai client."""
    if isinstance(exc, openai.APIConnectionError) and _refused(exc):
        return "connection"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code == 429:
            return "http_429"
        if code >= 500:
            return "http_5xx"
        return "http_4xx"
    if isinstance(exc, openai.APIResponseValidationError):
        return "malformed"
    return "error"


def _call_usage(usage: dict) -> tuple[tuple[str, int, int], ...]:
    """`usage.calls` of a composed endpoint; () when absent or not a list of well-formed calls."""
    calls = usage.get("calls")
    if not isinstance(calls, list):
        return ()
    out = []
    for c in calls:
        ok = isinstance(c, dict) and isinstance(c.get("model"), str)
        ok = ok and all(isinstance(c.get(k), int) and not isinstance(c.get(k), bool) for k in ("prompt_tokens", "completion_tokens"))
        if not ok:
            return ()
        out.append((c["model"], c["prompt_tokens"], c["completion_tokens"]))
    return tuple(out)


def parse_reply(kind: str, body: bytes) -> tuple[str, int, int, str | None, tuple[tuple[str, int, int], ...]]:
    """(text, prompt_tokens, completion_tokens, finish_reason, per-call usage); ValueError when malformed."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("reply body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("reply body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("reply has no choices")
    first = choices[0]
    if kind == "chat":
        message = first.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = first.get("text")
    if not isinstance(text, str):
        raise ValueError("reply choice has no text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
    completion_tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
    finish = first.get("finish_reason")
    return text, prompt_tokens, completion_tokens, finish if isinstance(finish, str) else None, _call_usage(usage)


async def _post(client: openai.AsyncOpenAI, request: LLMRequest) -> httpx2.Response:
    body: dict = {"model": request.model, "temperature": request.temperature, "max_tokens": request.max_tokens}
    if request.stop is not None:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.kind == "chat":
        body["messages"] = [dict(m) for m in request.messages or ()]
        path = "/chat/completions"
    else:
        body["prompt"] = request.prompt
        path = "/completions"
    # The client's documented raw route: same retries, timeouts and headers as
    # `chat.completions.create`, without its per-call TypedDict transform and pydantic
    # parsing, which cost ~3 ms of CPU per request, several times the HTTP work itself.
    return await client.post(path, cast_to=httpx2.Response, body=body)


async def send(client: openai.AsyncOpenAI, request: LLMRequest, *, malformed_retries: int) -> LLMResponse:
    """Send one request; raise `LLMCallError` once the transport or malformed budget is spent.

    On a client from `make_client`, `LLMResponse.retries` counts the transport retries
    and `malformed` the re-sends after a malformed body: the call cost
    1 + retries + malformed HTTP requests.
    """
    start = time.monotonic()
    tally = _Tally()
    token = _TALLY.set(tally)
    malformed = 0
    try:
        while True:
            try:
                raw = await _post(client, request)
            except openai.OpenAIError as exc:
                status = classify(exc)
                detail = f"HTTP {exc.status_code}" if isinstance(exc, openai.APIStatusError) else type(exc).__name__
                retries = max(0, tally.sent - 1 - malformed)
                raise LLMCallError(
                    status, f"{detail} after {retries} transport retries", retries=retries, malformed=malformed
                ) from None
            try:
                text, p_tok, c_tok, finish, call_usage = parse_reply(request.kind, raw.content)
            except ValueError as why:
                if malformed >= malformed_retries:
                    raise LLMCallError(
                        "malformed", f"{why} ({malformed + 1} times)",
                        retries=max(0, tally.sent - 1 - malformed), malformed=malformed,
                    ) from None
                malformed += 1
                # A server that just sent garbage is often mid-restart; a short pause is cheap.
                await asyncio.sleep(min(0.05 * 2**malformed, 1.0))
                continue
            return LLMResponse(
                text=text,
                prompt_tokens=p_tok,
                completion_tokens=c_tok,
                latency_s=time.monotonic() - start,
                finish_reason=finish,
                cached=False,
                retries=max(0, tally.sent - 1 - malformed),
                malformed=malformed,
                call_usage=call_usage,
            )
    finally:
        _TALLY.reset(token)
