"""The Ray Serve deployment: a FastAPI ingress speaking the OpenAI API in front of a backend.

Every way a request can be wrong ends as a 4xx with an OpenAI-style error body, decided
before the request reaches the batch queue, so one bad request never fails a batch of
good ones and never takes the replica down.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill_ray.config import ServeConfig
from distill_ray.serve.backend import Backend, Completion, SamplingParams
from distill_ray.serve.protocol import (
    ApiError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    parse_request,
)

logger = logging.getLogger(__name__)

# Which batch a request ran in, so clients and tests can see dynamic batching at work.
BATCH_SIZE_HEADER = "x-distill-batch-size"


def make_backend(model_dir: str, cfg: ServeConfig) -> Backend:
    if cfg.backend == "vllm":
        from distill_ray.serve.backend_vllm import VllmBackend

        return VllmBackend(model_dir, cfg)
    from distill_ray.serve.backend_transformers import TransformersBackend

    return TransformersBackend(model_dir, cfg, threads=max(1, int(cfg.replica_cpus)))


def _check_model(backend: Backend, requested: str) -> None:
    served = backend.model_info().name
    if requested != served:
        raise ApiError(404, f"model {requested!r} does not exist; this server serves {served!r}", param="model", code="model_not_found")


def _check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    problem = req.unsupported()
    if problem:
        param, reason = problem
        raise ApiError(400, reason, param=param, code="unsupported_parameter")


def _sampling(req: ChatCompletionRequest | CompletionRequest, prompt_len: int, context: int, default_max: int, param: str) -> SamplingParams:
    if prompt_len == 0:
        raise ApiError(400, f"{param}: encodes to zero tokens; nothing to continue from", param=param)
    room = context - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"{param}: {prompt_len} tokens, but the model's context is {context} tokens, leaving no room to generate",
            param=param,
            code="context_length_exceeded",
        )
    # A request for more than the context can hold is trimmed to fit (finish_reason tells).
    max_tokens = min(req.requested_max_tokens() or default_max, room)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_sequences(),
        seed=req.seed,
    )


def _usage(completions: list[Completion]) -> Usage:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _respond(body: Any, completions: list[Completion]) -> JSONResponse:
    sizes = [c.batch_size for c in completions if c.batch_size is not None]
    headers = {BATCH_SIZE_HEADER: str(max(sizes))} if sizes else None
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def build_api(backend: Backend, cfg: ServeConfig) -> FastAPI:
    api = FastAPI(title="distill-ray student", docs_url=None, redoc_url=None)
    info = backend.model_info()

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(), status_code=500)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=info.name, created=0, max_model_len=info.context_length)
        return ModelList(data=[card]).model_dump(mode="json")

    @api.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        req = parse_request(CompletionRequest, await request.body())
        _check_model(backend, req.model)
        _check_supported(req)
        prompts = [backend.encode(p) for p in req.prompts()]
        params = [_sampling(req, len(p), info.context_length, cfg.max_new_tokens, "prompt") for p in prompts]
        done = await backend.generate(prompts, params)
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(done)]
        return _respond(CompletionResponse(model=info.name, choices=choices, usage=_usage(done)), done)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        req = parse_request(ChatCompletionRequest, await request.body())
        _check_model(backend, req.model)
        _check_supported(req)
        prompt = backend.encode([m.model_dump(include={"role", "content"}) for m in req.messages])
        params = _sampling(req, len(prompt), info.context_length, cfg.max_new_tokens, "messages")
        done = await backend.generate([prompt], [params])
        choice = ChatChoice(index=0, message=ChatMessageOut(content=done[0].text), finish_reason=done[0].finish_reason)
        return _respond(ChatCompletionResponse(model=info.name, choices=[choice], usage=_usage(done)), done)

    return api


@serve.deployment
@serve.ingress()
class StudentServer:
    """One replica: loads the model once, then serves the API built around it."""

    def __init__(self, model_dir: str, serve_cfg: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.backend = make_backend(model_dir, self.cfg)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.backend, self.cfg)


def build_app(cfg: ServeConfig, model_dir: str) -> Application:
    return StudentServer.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        # Enough requests in flight per replica to fill a batch while the previous one decodes.
        max_ongoing_requests=max(16, 2 * cfg.max_batch_size),
        # One access-log line per request drowns a run's progress output; errors still log.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    ).bind(model_dir, cfg.model_dump())
