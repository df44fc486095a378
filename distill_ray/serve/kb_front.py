"""NesyCD at the endpoint: a Serve deployment that retrieves from the knowledge base, then asks the student.

One Serve application, two deployments: this ingress speaks the same OpenAI API as the
plain student (so any OpenAI client, and the eval stage, get NesyCD behaviour without
knowing it), and calls the student deployment through a Serve handle. Per question:

1. with a confidence gate, the student first answers the bare question; if it is sure
   (geometric-mean token probability >= `gate_confidence`) that answer stands;
2. otherwise the KB is searched (query = task description + question; a chat request's
   system message is the task description), the best `use` entries whose similarity
   clears `min_similarity` go into the prompt, and the student answers that.

The KB table is read at every request, so a person's edit (`distill-ray kb add/rm/import`)
changes the next answer, with no retraining and no redeploy. Responses carry, besides
the OpenAI fields, `knowledge` (per choice: the entries used, or [] when none) and
`kb_version`; usage adds up every student call made for the request and lists them in
`usage.calls`, so each is priced at its own length.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from distill_ray.config import Config, ServeConfig
from distill_ray.serve.app import build_app, check_request, deployment_options
from distill_ray.serve.api_errors import install_error_handlers
from distill_ray.serve.backend import Completion
from distill_ray.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    chat_response,
    completion_response,
    parse_request,
    summed_usage,
)


@dataclass(frozen=True)
class FrontSettings:
    uri: str
    table: str
    embedding_model: str
    mode: str = "hybrid"
    top_k: int = 3
    use: int = 1
    min_similarity: float = 0.3
    gate_confidence: float | None = None
    context_length: int = 512


@dataclass
class Answer:
    completion: Completion
    knowledge: list[dict]
    calls: list[Completion]
    gated: bool = False  # the gate found the student sure: no retrieval
    gate_used: bool = False  # the student answered the bare question first


def extract_question(prompt: str) -> str:
    """The question of a student prompt ("Question: ...\\nAnswer:"), or the text as it is."""
    from distill_ray.teacher.prompts import last_question

    return last_question(prompt) or prompt.strip()


class KnowledgeFrontCore:
    """Everything but the HTTP layer; a plain class so it can be driven directly in tests."""

    def __init__(self, student, settings: FrontSettings, serve_cfg: ServeConfig) -> None:
        from distill_ray.knowledge.kb import KnowledgeBase

        self.student, self.settings, self.cfg = student, settings, serve_cfg
        self.kb = KnowledgeBase(settings.uri, settings.table, settings.embedding_model)

    async def _ask(self, prompt: str, max_tokens: int | None, params: dict) -> Completion:
        return await self.student.complete.remote(prompt, max_tokens, **params)

    def retrieve(self, question: str, task_description: str) -> tuple[list[dict], int]:
        from distill_ray.knowledge.kb_search import search

        s = self.settings
        hits = search(self.kb, [question], mode=s.mode, k=s.top_k, task_descriptions=[task_description])[0]
        chosen = [h.as_dict() for h in hits if h.similarity >= s.min_similarity][: s.use]
        return chosen, self.kb.version

    async def answer(self, question: str, task_description: str, max_tokens: int | None, params: dict) -> Answer:
        from distill_ray.methods.nesycd import kb_prompt
        from distill_ray.methods.recipe import question_prompt

        calls: list[Completion] = []
        gate = self.settings.gate_confidence
        if gate is not None:
            first = await self._ask(question_prompt(question), max_tokens, params)
            calls.append(first)
            if first.confidence is not None and first.confidence >= gate:
                return Answer(first, [], calls, gated=True, gate_used=True)
        # LanceDB and the query embedding block; off the event loop, other requests go on.
        chosen, _ = await asyncio.to_thread(self.retrieve, question, task_description)
        final = await self._ask(kb_prompt(question, [c["text"] for c in chosen]), max_tokens, params)
        calls.append(final)
        return Answer(final, chosen, calls, gate_used=gate is not None)


def _usage(answers: list[Answer]) -> Usage:
    return summed_usage((c.prompt_tokens, c.completion_tokens) for a in answers for c in a.calls)


def _params(req: ChatCompletionRequest | CompletionRequest) -> dict:
    return {"temperature": req.temperature, "stop": req.stop_sequences(), "seed": req.seed}


def _body(response: Any, answers: list[Answer], version: int | None) -> JSONResponse:
    body = response.model_dump(mode="json")
    # Each student call on its own, so its cost is priced at its own context length (the eval stage reads these).
    body["usage"]["calls"] = [{"model": response.model, "prompt_tokens": c.prompt_tokens,
                               "completion_tokens": c.completion_tokens} for a in answers for c in a.calls]
    body["knowledge"] = [a.knowledge for a in answers]
    body["retrieval_skipped"] = [a.gated for a in answers]
    body["confidence"] = [a.calls[0].confidence if a.gate_used else None for a in answers]
    body["kb_version"] = version
    return JSONResponse(body)


def build_front_api(core: KnowledgeFrontCore) -> FastAPI:
    api = FastAPI(title="distill-ray student + knowledge base", docs_url=None, redoc_url=None)
    name = core.cfg.model_name

    install_error_handlers(api)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=name, created=0, max_model_len=core.settings.context_length)
        return ModelList(data=[card]).model_dump(mode="json")

    @api.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        req = parse_request(CompletionRequest, await request.body())
        check_request(req, name)
        answers = await asyncio.gather(*(core.answer(extract_question(p), "", req.max_tokens, _params(req))
                                         for p in req.prompts()))
        outputs = [(a.completion.text, a.completion.finish_reason) for a in answers]
        return _body(completion_response(name, outputs, _usage(answers)), answers,
                     await asyncio.to_thread(lambda: core.kb.version))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        req = parse_request(ChatCompletionRequest, await request.body())
        check_request(req, name)
        users = [m.content for m in req.messages if m.role == "user"]
        if not users or not users[-1].strip():
            raise ApiError(400, "messages: no user message with a question to answer", param="messages")
        description = " ".join(m.content for m in req.messages if m.role == "system")
        answer = await core.answer(extract_question(users[-1]), description, req.requested_max_tokens(), _params(req))
        final = answer.completion
        return _body(chat_response(name, final.text, final.finish_reason, _usage([answer])), [answer],
                     await asyncio.to_thread(lambda: core.kb.version))

    return api


@serve.deployment
@serve.ingress()
class KnowledgeFront:
    def __init__(self, student: DeploymentHandle, settings: dict, serve_cfg: dict) -> None:
        import torch

        from distill_ray.knowledge.embed import load_model

        torch.set_num_threads(1)  # a query embedding is tiny; leave the cores to the student
        self.core = KnowledgeFrontCore(student, FrontSettings(**settings), ServeConfig.model_validate(serve_cfg))
        load_model(self.core.settings.embedding_model)  # now, not on the first request

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_front_api(self.core)


def build_front_app(cfg: Config, model_dir: str, settings: FrontSettings) -> Application:
    student = build_app(cfg.serve, model_dir, ingress=False)
    return KnowledgeFront.options(
        num_replicas=cfg.serve.num_replicas, **deployment_options(cfg.serve, num_cpus=0.25),
    ).bind(student, asdict(settings), cfg.serve.model_dump())
