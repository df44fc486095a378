"""One Ray Serve deployment serving several LoRA adapters on one base: the request's
`model` names the adapter.

Over HTTP it speaks the OpenAI API (`/v1/models` lists the adapters). A deployment
composed in front of it (the Socratic ingress) calls the same code through its handle:
`openai(path, body)` answers a raw API request, `complete(adapter, prompt, ...)` one
completion, `dialogue(question, settings, ...)` a whole Socratic dialogue between two of
its adapters, `stats()` says what the replica holds.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.deployment import Application

from distill_ray.config import ServeConfig
from distill_ray.serve.api_errors import error_reply, install_error_handlers
from distill_ray.serve.app import deployment_options, sampling_for, usage_of
from distill_ray.serve.backend import Completion
from distill_ray.serve.dialogue import Dialogue, DialogueSettings, run_dialogue
from distill_ray.serve.multiplex import read_adapters
from distill_ray.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    chat_response,
    check_supported,
    completion_response,
    parse_request,
)

API_PATHS = ("completions", "chat/completions")


def make_adapter_backend(model_dir: str, cfg: ServeConfig):
    adapters = read_adapters(model_dir)
    if cfg.backend == "vllm":
        from distill_ray.serve.multiplex_vllm import VllmAdapterBackend

        return VllmAdapterBackend(model_dir, adapters, cfg)
    from distill_ray.serve.multiplex import AdapterBackend

    return AdapterBackend(model_dir, adapters, cfg, threads=max(1, int(cfg.replica_cpus)))


class AdapterApi:
    """The OpenAI API over an adapter backend, shared by the HTTP routes and the handle."""

    def __init__(self, backend, cfg: ServeConfig) -> None:
        self.backend, self.cfg = backend, cfg

    def model_cards(self) -> list[dict]:
        return [ModelCard(id=name, created=0, max_model_len=self.backend.model_info(name).context_length).model_dump(mode="json")
                for name in self.backend.adapter_names()]

    def _adapter(self, requested: str) -> str:
        if requested not in self.backend.adapter_names():
            served = ", ".join(repr(n) for n in self.backend.adapter_names())
            raise ApiError(404, f"model {requested!r} does not exist; this server serves {served}", param="model",
                           code="model_not_found")
        return requested

    async def completions(self, body: bytes) -> dict:
        req = parse_request(CompletionRequest, body)
        adapter = self._adapter(req.model)
        check_supported(req)
        context = self.backend.model_info(adapter).context_length
        prompts = [self.backend.encode(p) for p in req.prompts()]
        params = [self._params(req, len(p), context, "prompt") for p in prompts]
        done = await self.backend.generate(adapter, prompts, params)
        outputs = [(c.text, c.finish_reason) for c in done]
        return completion_response(adapter, outputs, usage_of(done)).model_dump(mode="json")

    async def chat_completions(self, body: bytes) -> dict:
        req = parse_request(ChatCompletionRequest, body)
        adapter = self._adapter(req.model)
        check_supported(req)
        prompt = self.backend.encode([m.model_dump(include={"role", "content"}) for m in req.messages])
        params = self._params(req, len(prompt), self.backend.model_info(adapter).context_length, "messages")
        done = await self.backend.generate(adapter, [prompt], [params])
        return chat_response(adapter, done[0].text, done[0].finish_reason, usage_of(done)).model_dump(mode="json")

    def _params(self, req, prompt_len: int, context: int, param: str):
        return sampling_for(prompt_len, context, req.requested_max_tokens() or self.cfg.max_new_tokens, param,
                            temperature=req.temperature, top_p=req.top_p, stop=req.stop_sequences(), seed=req.seed)

    async def answer(self, path: str, body: bytes) -> tuple[int, dict]:
        """(status, JSON body) for a request to /v1/<path>; errors as OpenAI error bodies."""
        try:
            if path == "completions":
                return 200, await self.completions(body)
            if path == "chat/completions":
                return 200, await self.chat_completions(body)
            raise ApiError(404, f"no route /v1/{path}")
        except ApiError as e:
            return error_reply(e)


def build_adapter_api(api_impl: AdapterApi, stats) -> FastAPI:
    api = FastAPI(title="distill-ray adapters", docs_url=None, redoc_url=None)
    install_error_handlers(api)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": api_impl.model_cards()}

    @api.get("/debug/adapters")
    async def debug_adapters() -> dict[str, Any]:
        return stats()

    @api.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return JSONResponse(await api_impl.completions(await request.body()))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        return JSONResponse(await api_impl.chat_completions(await request.body()))

    return api


class AdapterReplica:
    """One replica: the base loaded once, every adapter of `model_dir/adapters.json` beside it.

    Reached through its handle when composed (Serve allows one HTTP ingress per app);
    `AdapterHttpServer` is the same replica with the HTTP API, for serving it alone.
    """

    def __init__(self, model_dir: str, serve_cfg: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.backend = make_adapter_backend(model_dir, self.cfg)
        self.api = AdapterApi(self.backend, self.cfg)

    async def openai(self, path: str, body: bytes) -> tuple[int, dict]:
        return await self.api.answer(path, body)

    def models(self) -> list[dict]:
        return self.api.model_cards()

    def stats(self) -> dict:
        return self.backend.stats()

    async def complete(self, adapter: str, prompt: str, max_tokens: int, *, temperature: float = 0.0,
                       top_p: float = 1.0, stop: tuple[str, ...] = (), seed: int | None = None) -> Completion | None:
        """One raw-prompt completion by `adapter`; None when the prompt leaves no room to generate."""
        ids = self.backend.encode(prompt)
        room = self.backend.model_info(adapter).context_length - len(ids)
        if not ids or room < 1:
            return None
        params = sampling_for(len(ids), room + len(ids), max_tokens, "prompt",
                              temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed)
        return (await self.backend.generate(adapter, [ids], [params]))[0]

    async def dialogue(self, question: str, settings: DialogueSettings, max_steps: int, **sampling) -> Dialogue:
        """Socratic CoT's decomposer/solver dialogue on `question`, every call batched here."""
        return await run_dialogue(self.complete, question, settings, max_steps, **sampling)


AdapterServer = serve.deployment(AdapterReplica, name="AdapterServer")


@serve.deployment
@serve.ingress()
class AdapterHttpServer(AdapterReplica):
    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_adapter_api(self.api, self.stats)


def adapter_deployment(cfg: ServeConfig, *, http: bool = False):
    return (AdapterHttpServer if http else AdapterServer).options(
        num_replicas=cfg.num_replicas, **deployment_options(cfg, num_cpus=cfg.replica_cpus, num_gpus=cfg.replica_gpus),
    )


def build_adapter_app(cfg: ServeConfig, model_dir: str) -> Application:
    """The adapters alone as an app (the Socratic app puts its dialogue in front)."""
    return adapter_deployment(cfg, http=True).bind(model_dir, cfg.model_dump())
