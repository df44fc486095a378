"""The Socratic endpoint: a decomposer and a solver in dialogue behind one OpenAI-compatible model.

Two deployments: `AdapterServer` holds the base once with both adapters and runs each
dialogue (`serve/dialogue.py`) against its own batcher; this ingress speaks HTTP and
hands it one question per call. A request for `serve.model_name` is one question (a
house-format prompt "Question: ...\\nAnswer:" or the bare question; for chat, the last
user message). The dialogue alternates decomposer (next sub-question, or "[done]") and
solver (its sub-answer) until the decomposer is done or `max_steps` sub-questions are
answered (the step limit: `method.socratic.max_steps`, per request `max_steps` in the
body). The reply is the sub-question trail, then "Therefore, the answer is N." read off
the last sub-answer. `max_tokens` bounds each call (with `method.socratic.step_max_tokens`),
not the whole dialogue. `usage` sums every call; `usage.calls` lists them (model, prompt
and completion tokens), so the eval stage prices each call on its own.

A request naming `decomposer` or `solver` goes to that adapter unchanged.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.deployment import Application

from distill_ray.config import Config
from distill_ray.methods.socratic_format import DECOMPOSER, SOLVER
from distill_ray.serve.api_errors import install_error_handlers
from distill_ray.serve.app import deployment_options
from distill_ray.serve.dialogue import Dialogue, DialogueSettings
from distill_ray.serve.multiplex import read_adapters
from distill_ray.serve.multiplex_app import adapter_deployment
from distill_ray.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    Usage,
    chat_response,
    check_supported,
    completion_response,
    parse_request,
    summed_usage,
)
from distill_ray.teacher.prompts import last_question

class CallUsage(BaseModel):
    model: str
    prompt_tokens: int
    completion_tokens: int


class DialogueUsage(Usage):
    calls: list[CallUsage]


def _question(text: str) -> str:
    question = last_question(text) or text.strip()
    if not question:
        raise ApiError(400, "the prompt holds no question", param="prompt")
    return question


def _max_steps(body: bytes, default: int) -> int:
    try:
        value = json.loads(body).get("max_steps", default)
    except (ValueError, AttributeError):
        return default  # parse_request reports the malformed body
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"max_steps must be a positive integer, got {value!r}", param="max_steps")
    return value


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _usage(dialogues: list[Dialogue]) -> DialogueUsage:
    calls = [CallUsage(model=a, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
             for d in dialogues for a, c in d.calls]
    total = summed_usage((c.prompt_tokens, c.completion_tokens) for c in calls)
    return DialogueUsage(**total.model_dump(), calls=calls)


class SocraticApi:
    def __init__(self, pair, settings: DialogueSettings) -> None:
        self.pair, self.s = pair, settings

    async def _dialogue(self, req, text: str, max_steps: int) -> tuple[Dialogue, str, str]:
        check_supported(req)
        d = await self.pair.dialogue.remote(_question(text), self.s, max_steps, temperature=req.temperature,
                                            top_p=req.top_p, seed=req.seed, max_tokens=req.requested_max_tokens())
        reply, cut = _cut_at_stop(d.text(), req.stop_sequences())
        return d, reply, "length" if d.limit_hit and not cut else "stop"

    async def completions(self, body: bytes) -> tuple[int, dict]:
        req = parse_request(CompletionRequest, body)
        if req.model != self.s.model_name:
            return await self.pair.openai.remote("completions", body)
        max_steps = _max_steps(body, self.s.max_steps)
        # Dialogues of a prompt list run side by side, so their calls share the adapters' batches.
        done = await asyncio.gather(*(self._dialogue(req, prompt, max_steps) for prompt in req.prompts()))
        dialogues = [d for d, _, _ in done]
        body_out = completion_response(self.s.model_name, [(reply, finish) for _, reply, finish in done], _usage(dialogues))
        return 200, body_out.model_dump(mode="json", serialize_as_any=True)  # keeps usage.calls

    async def chat_completions(self, body: bytes) -> tuple[int, dict]:
        req = parse_request(ChatCompletionRequest, body)
        if req.model != self.s.model_name:
            return await self.pair.openai.remote("chat/completions", body)
        users = [m.content for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: no user message holds a question", param="messages")
        d, reply, finish = await self._dialogue(req, users[-1], _max_steps(body, self.s.max_steps))
        body_out = chat_response(self.s.model_name, reply, finish, _usage([d]))
        return 200, body_out.model_dump(mode="json", serialize_as_any=True)

    async def models(self) -> list[dict]:
        adapters = await self.pair.models.remote()
        context = min(card["max_model_len"] for card in adapters)
        return [ModelCard(id=self.s.model_name, created=0, max_model_len=context).model_dump(mode="json"), *adapters]


def build_socratic_api(impl: SocraticApi) -> FastAPI:
    api = FastAPI(title="distill-ray socratic", docs_url=None, redoc_url=None)
    install_error_handlers(api)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await impl.models()}

    @api.get("/debug/adapters")
    async def debug_adapters() -> dict[str, Any]:
        return await impl.pair.stats.remote()

    @api.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        status, body = await impl.completions(await request.body())
        return JSONResponse(body, status_code=status)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        status, body = await impl.chat_completions(await request.body())
        return JSONResponse(body, status_code=status)

    return api


@serve.deployment
@serve.ingress()
class SocraticServer:
    """The ingress: light (no model), it only runs dialogues against the adapter deployment."""

    def __init__(self, pair, settings: dict[str, Any]) -> None:
        self.api = SocraticApi(pair, DialogueSettings(**settings))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_socratic_api(self.api)

    async def stats(self) -> dict:
        return await self.api.pair.stats.remote()


def build_socratic_app(cfg: Config, model_dir: str) -> Application:
    """The recipe's `serve_app`: `model_dir` is a base with the decomposer and solver adapters."""
    adapters = read_adapters(model_dir)
    missing = [name for name in (DECOMPOSER, SOLVER) if name not in adapters]
    if missing:
        raise ValueError(f"{model_dir}: no {' or '.join(missing)} adapter (has {', '.join(adapters)})")
    if cfg.serve.model_name in adapters:
        raise ValueError(f"serve.model_name {cfg.serve.model_name!r} would hide the adapter of that name")
    s = cfg.method.socratic
    settings = DialogueSettings(cfg.serve.model_name, s.max_steps, s.step_max_tokens)
    pair = adapter_deployment(cfg.serve).bind(model_dir, cfg.serve.model_dump())
    # The dialogue waits on the adapter replica; it needs almost no CPU of its own.
    return SocraticServer.options(**deployment_options(cfg.serve, num_cpus=0.1)).bind(pair, asdict(settings))
