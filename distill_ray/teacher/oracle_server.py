"""The oracle teacher's HTTP app: OpenAI-compatible routes plus seeded fault injection.

Faults are drawn from `Random(seed, hash(body), n)` where n counts earlier requests with
the same body: the same request gets the same fate on its n-th arrival whatever the
interleaving of concurrent clients, so a seeded run is reproducible. A transport retry
re-sends the same body, so it draws afresh (n + 1) and can succeed.

The two completion routes are served by a small ASGI fast lane in front of the FastAPI
app (which serves everything else): FastAPI's per-request machinery measured ~0.2 ms
of CPU, half of the oracle's cost per request, and at a few hundred requests per second
on a 2-core box that CPU is what the benchmarked client needs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import Response

from distill_ray.config import FaultConfig
from distill_ray.teacher.oracle_answers import corrupt, reply_to

_JSON_HEADERS = [(b"content-type", b"application/json")]
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


@dataclass
class OracleState:
    faults: FaultConfig
    model: str
    seen: dict[str, int] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    # Wall-clock span of the traffic since the last reset: benchmarks measure throughput
    # from the server's side, so client start-up time does not count as serving time.
    first_request_at: float | None = None
    first_reply_at: float | None = None
    last_reply_at: float | None = None
    replies_per_100ms: Counter = field(default_factory=Counter)  # by 0.1 s bucket after first_request_at

    @property
    def any_fault(self) -> bool:
        f = self.faults
        return bool(f.p_5xx or f.p_429 or f.p_timeout or f.p_malformed or f.p_wrong)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def check_faults(faults: FaultConfig) -> None:
    total = faults.p_5xx + faults.p_429 + faults.p_timeout + faults.p_malformed
    if total > 1:
        raise ValueError(f"oracle faults: p_5xx + p_429 + p_timeout + p_malformed must be <= 1, got {total:.3f}")


def _json(obj: dict, status: int = 200, headers: tuple = ()) -> Reply:
    return Reply(status, json.dumps(obj, ensure_ascii=False).encode(), headers)


def _error(status: int, message: str, kind: str, headers: tuple = ()) -> Reply:
    return _json({"error": {"message": message, "type": kind, "code": status}}, status, headers)


def _draw(state: OracleState, body: bytes) -> random.Random:
    key = hashlib.blake2b(body, digest_size=8).hexdigest()
    n = state.seen.get(key, 0)
    state.seen[key] = n + 1
    return random.Random(f"{state.faults.seed}:{key}:{n}")


async def _fault(state: OracleState, rng: random.Random) -> Reply | None:
    """A fault reply for this request, or None to answer it normally."""
    f = state.faults
    r = rng.random()
    if r < f.p_5xx:
        state.stats["fault_5xx"] += 1
        return _error(503, "the oracle is overloaded (injected)", "server_error")
    r -= f.p_5xx
    if r < f.p_429:
        state.stats["fault_429"] += 1
        return _error(429, "rate limit reached (injected)", "rate_limit_error", ((b"retry-after", b"0"),))
    r -= f.p_429
    if r < f.p_timeout:
        state.stats["fault_timeout"] += 1
        await asyncio.sleep(f.timeout_hang_s)
        return _error(504, "the oracle hung (injected)", "timeout")
    r -= f.p_timeout
    if r < f.p_malformed:
        state.stats["fault_malformed"] += 1
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        if rng.random() < 0.5:
            return Reply(200, b'{"id": "cmpl-broken", "choices": [{"index": 0, "mess')
        return _json({"id": "cmpl-empty", "object": "chat.completion", "model": state.model})
    return None


def _cut(text: str, max_tokens) -> tuple[str, str]:
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = text.split(" ")
        if len(words) > max_tokens:
            return " ".join(words[:max_tokens]), "length"
    return text, "stop"


async def complete(state: OracleState, route: str, body: bytes) -> Reply:
    """Answer one completion request (route "chat" or "completions") given its raw body."""
    if state.first_request_at is None:
        state.first_request_at = time.time()
    state.stats["requests"] += 1
    state.stats[route] += 1
    wanted = "messages" if route == "chat" else "prompt"
    try:
        payload = json.loads(body)
    except ValueError:
        return _error(400, "request body is not JSON", "invalid_request_error")
    if not isinstance(payload, dict) or wanted not in payload:
        return _error(400, f"request body needs '{wanted}'", "invalid_request_error")
    rng = _draw(state, body) if state.any_fault else None
    if rng is not None:
        fault = await _fault(state, rng)
        if fault is not None:
            return fault
    if state.faults.latency_s:
        await asyncio.sleep(state.faults.latency_s)
    if route == "chat":
        raw = payload["messages"] if isinstance(payload["messages"], list) else []
        messages = [m for m in raw if isinstance(m, dict)]
        text, kind = reply_to(messages=messages)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    else:
        text, kind = reply_to(prompt=str(payload["prompt"]))
        prompt_tokens = len(str(payload["prompt"]).split())
    state.stats[f"kind_{kind}"] += 1
    if rng is not None and state.faults.p_wrong and rng.random() < state.faults.p_wrong:
        state.stats["wrong"] += 1
        text = corrupt(text, rng, kind)
    text, finish = _cut(text, payload.get("max_tokens"))
    state.stats["answered"] += 1
    state.last_reply_at = time.time()
    if state.first_reply_at is None:
        state.first_reply_at = state.last_reply_at
    state.replies_per_100ms[int((state.last_reply_at - state.first_request_at) * 10)] += 1
    completion_tokens = len(text.split())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if route == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return _json({"id": f"oracle-{state.stats['answered']}", "object": obj, "created": int(time.time()),
                  "model": state.model, "choices": [choice], "usage": usage})


def _fastapi_app(state: OracleState) -> FastAPI:
    app = FastAPI(title="oracle teacher", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/models")
    async def models() -> Response:
        data = [{"id": state.model, "object": "model", "created": 0, "owned_by": "distill-ray"}]
        return Response(json.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/stats")
    async def stats() -> Response:
        buckets = state.replies_per_100ms
        timeline = [buckets.get(i, 0) for i in range(max(buckets) + 1)] if buckets else []
        snapshot = {**state.stats, "first_request_at": state.first_request_at, "first_reply_at": state.first_reply_at,
                    "last_reply_at": state.last_reply_at, "replies_per_100ms": timeline}
        return Response(json.dumps(snapshot), media_type="application/json")

    @app.post("/stats/reset")
    async def reset() -> Response:
        state.stats.clear()
        state.replies_per_100ms.clear()
        state.first_request_at = state.first_reply_at = state.last_reply_at = None
        return Response(b'{"reset": true}', media_type="application/json")

    return app


def _authorized(scope, expected: bytes | None) -> bool:
    if expected is None:
        return True
    return any(k == b"authorization" and v == expected for k, v in scope.get("headers", ()))


async def _send_reply(send, reply: Reply) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(reply.body)).encode()), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def create_app(faults: FaultConfig, model: str = "oracle", api_key: str | None = None):
    """The ASGI app: completion routes on the fast lane, the rest on FastAPI.

    With `api_key`, /v1 routes answer 401 unless sent `Authorization: Bearer <api_key>`,
    as a hosted teacher would (tests use it to prove the key is sent, and sent only there).
    """
    check_faults(faults)
    # Answer once before serving: first-call costs (regex compilation, lazy imports)
    # would otherwise land on the first burst of requests.
    reply_to(prompt="Question: warm-up\nAnswer:")
    state = OracleState(faults=faults, model=model)
    slow = _fastapi_app(state)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def app(scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v1/") and not _authorized(scope, expected):
            state.stats["unauthorized"] += 1
            await _send_reply(send, _error(401, "invalid API key", "invalid_request_error"))
            return
        route = ROUTES.get(path)
        if route is None or scope.get("method") != "POST":
            await slow(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await _send_reply(send, await complete(state, route, b"".join(chunks)))

    app.state = state  # type: ignore[attr-defined]  # for in-process tests
    return app
