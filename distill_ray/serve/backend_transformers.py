"""CPU backend: a Hugging Face causal LM loaded once per replica, with dynamic batching.

Concurrent requests are queued by `@serve.batch` and decoded together by `decode_batch`;
a multi-prompt request contributes one queue entry per prompt, so it batches with others.
It must run inside a Serve replica (the batch queue lives there).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ray import serve

from distill_ray.config import ServeConfig
from distill_ray.serve.backend import (
    Completion,
    ModelInfo,
    SamplingParams,
    context_length,
    encode_prompt,
    eos_token_ids,
)
from distill_ray.serve.decoding import decode_batch
from distill_ray.train.student import load_pretrained

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Pending:
    prompt: list[int]
    params: SamplingParams


class TransformersBackend:
    def __init__(self, model_dir: str, cfg: ServeConfig, threads: int | None = None) -> None:
        if threads:
            # One replica per reserved CPU share: more intra-op threads than that only fight
            # the neighbouring replicas for the same cores.
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_pretrained(model_dir)
        self.model.eval()
        self._eos_ids = eos_token_ids(self.model, self.tokenizer)
        self._info = ModelInfo(
            name=cfg.model_name,
            source=model_dir,
            context_length=context_length(self.model.config, self.tokenizer),
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )
        # The decorator's arguments are fixed at import; the configured values apply here.
        self._decode_queued.set_max_batch_size(cfg.max_batch_size)
        self._decode_queued.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def model_info(self) -> ModelInfo:
        return self._info

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    async def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return list(await asyncio.gather(*(self._decode_queued(_Pending(list(p), sp)) for p, sp in zip(prompts, params))))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def _decode_queued(self, pending: list[_Pending]) -> list[Completion]:
        started = time.perf_counter()
        # Decoding blocks for the whole batch; off the event loop, the replica keeps
        # accepting requests (they form the next batch) and answering health checks.
        results = await asyncio.to_thread(
            decode_batch,
            self.model,
            self.tokenizer,
            [p.prompt for p in pending],
            [p.params for p in pending],
            self._eos_ids,
        )
        logger.debug(
            "decoded a batch of %d: %d prompt + %d completion tokens in %.3f s",
            len(pending),
            sum(c.prompt_tokens for c in results),
            sum(c.completion_tokens for c in results),
            time.perf_counter() - started,
        )
        return results
