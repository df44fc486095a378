"""The Ray Serve deployment: a FastAPI ingress speaking the OpenAI API in front of a backend.

Every way a request can be wrong ends as a 4xx with an OpenAI-style error body, decided
before the request reaches the batch queue, so one bad request never fails a batch of
good ones and never takes the replica down.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.deployment import Application

from distill_ray.config import ServeConfig
from distill_ray.serve.api_errors import install_error_handlers
from distill_ray.serve.backend import Backend, Completion, SamplingParams
from distill_ray.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    chat_response,
    check_supported,
    completion_response,
    parse_request,
    summed_usage,
)

# Which batch a request ran in, so clients and tests can see dynamic batching at work.
BATCH_SIZE_HEADER = "x-distill-batch-size"


def make_backend(model_dir: str, cfg: ServeConfig) -> Backend:
    if cfg.backend == "vllm":
        from distill_ray.serve.backend_vllm import VllmBackend

        return VllmBackend(model_dir, cfg)
    from distill_ray.serve.backend_transformers import TransformersBackend

    return TransformersBackend(model_dir, cfg, threads=max(1, int(cfg.replica_cpus)))


def check_request(req: ChatCompletionRequest | CompletionRequest, served: str) -> None:
    """404 for another model's name, 400 for an option this server cannot honour."""
    if req.model != served:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {served!r}", param="model", code="model_not_found")
    check_supported(req)


def _sampling(req: ChatCompletionRequest | CompletionRequest, prompt_len: int, context: int, default_max: int, param: str) -> SamplingParams:
    return sampling_for(prompt_len, context, req.requested_max_tokens() or default_max, param,
                        temperature=req.temperature, top_p=req.top_p, stop=req.stop_sequences(), seed=req.seed)


def sampling_for(prompt_len: int, context: int, max_tokens: int, param: str, **sampling: Any) -> SamplingParams:
    """Sampling params for a prompt of `prompt_len` tokens; an ApiError if it cannot be served."""
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
    return SamplingParams(max_tokens=min(max_tokens, room), **sampling)


def usage_of(completions: list[Completion]) -> Usage:
    return summed_usage((c.prompt_tokens, c.completion_tokens) for c in completions)


def _respond(body: Any, completions: list[Completion]) -> JSONResponse:
    sizes = [c.batch_size for c in completions if c.batch_size is not None]
    headers = {BATCH_SIZE_HEADER: str(max(sizes))} if sizes else None
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def build_api(backend: Backend, cfg: ServeConfig) -> FastAPI:
    api = FastAPI(title="distill-ray student", docs_url=None, redoc_url=None)
    info = backend.model_info()

    install_error_handlers(api)

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
        check_request(req, info.name)
        prompts = [backend.encode(p) for p in req.prompts()]
        params = [_sampling(req, len(p), info.context_length, cfg.max_new_tokens, "prompt") for p in prompts]
        done = await backend.generate(prompts, params)
        outputs = [(c.text, c.finish_reason) for c in done]
        return _respond(completion_response(info.name, outputs, usage_of(done)), done)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        req = parse_request(ChatCompletionRequest, await request.body())
        check_request(req, info.name)
        prompt = backend.encode([m.model_dump(include={"role", "content"}) for m in req.messages])
        params = _sampling(req, len(prompt), info.context_length, cfg.max_new_tokens, "messages")
        done = await backend.generate([prompt], [params])
        return _respond(chat_response(info.name, done[0].text, done[0].finish_reason, usage_of(done)), done)

    return api


class StudentReplica:
    """One replica's model, loaded once. Handle calls reach `complete`; the HTTP API comes with
    the ingress variant below."""

    def __init__(self, model_dir: str, serve_cfg: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.backend = make_backend(model_dir, self.cfg)

    async def complete(self, prompt: str, max_tokens: int | None = None, *, temperature: float = 0.0,
                       stop: tuple[str, ...] = (), seed: int | None = None) -> Completion:
        """One raw-prompt completion, for a deployment composed in front of this one (a Serve
        handle call, no HTTP). The Completion carries the log-probability HTTP clients never see."""
        ids = self.backend.encode(prompt)
        info = self.backend.model_info()
        params = sampling_for(len(ids), info.context_length, max_tokens or self.cfg.max_new_tokens, "prompt",
                              temperature=temperature, stop=tuple(stop), seed=seed)
        return (await self.backend.generate([ids], [params]))[0]


@serve.deployment
@serve.ingress()
class StudentServer(StudentReplica):
    """The student behind the OpenAI API (an application's one ingress)."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.backend, self.cfg)


# The same student without HTTP, for applications whose ingress is another deployment
# (Serve allows one ingress per application).
StudentModel = serve.deployment(StudentReplica)


def deployment_options(cfg: ServeConfig, *, num_cpus: float, num_gpus: float = 0.0) -> dict:
    """The options every deployment of an app shares; callers add `num_replicas` where it scales."""
    return dict(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Enough requests in flight per replica to fill a batch while the previous one decodes.
        max_ongoing_requests=max(16, 2 * cfg.max_batch_size),
        # One access-log line per request drowns a run's progress output; errors still log.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        max_constructor_retry_count=cfg.start_attempts,
        # A stopping replica sleeps this long before each check for requests still in flight:
        # with Serve's 2 s default every removal of an idle app took over 2 s.
        graceful_shutdown_wait_loop_s=0.2,
    )


def build_app(cfg: ServeConfig, model_dir: str, *, ingress: bool = True) -> Application:
    deployment = StudentServer if ingress else StudentModel
    return deployment.options(
        num_replicas=cfg.num_replicas, **deployment_options(cfg, num_cpus=cfg.replica_cpus, num_gpus=cfg.replica_gpus),
    ).bind(model_dir, cfg.model_dump())
