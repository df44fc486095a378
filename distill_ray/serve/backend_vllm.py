"""GPU backend: a vLLM async engine behind the same interface as the transformers backend.

vLLM batches continuously on its own, so requests go straight to the engine (no Serve
batch queue). `vllm` is imported only when this backend is built, so the rest of the
package never needs it.
"""
from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Sequence
from typing import Any

from distill_ray.config import ServeConfig
from distill_ray.serve.backend import (
    Completion,
    MissingExtraError,
    ModelInfo,
    SamplingParams,
    context_length,
    encode_prompt,
)

MISSING_VLLM = "backend vllm needs the optional extra: pip install distill-ray[vllm]"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise MissingExtraError(MISSING_VLLM) from e
    return vllm


class VllmBackend:
    def __init__(self, model_dir: str, cfg: ServeConfig) -> None:
        vllm = _import_vllm()
        from transformers import AutoConfig, AutoTokenizer

        self._vllm = vllm
        engine_args = {"model": model_dir, **cfg.vllm}
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**engine_args))
        # Encoding here, with the same code as the CPU backend, keeps prompt rendering and
        # usage counts identical whichever backend serves the model.
        self.tokenizer = AutoTokenizer.from_pretrained(engine_args.get("tokenizer") or model_dir)
        self._info = ModelInfo(
            name=cfg.model_name,
            source=model_dir,
            context_length=context_length(AutoConfig.from_pretrained(model_dir), self.tokenizer, cfg.vllm.get("max_model_len")),
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )

    def model_info(self) -> ModelInfo:
        return self._info

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    async def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return list(await asyncio.gather(*(self._one(list(p), sp) for p, sp in zip(prompts, params))))

    async def _one(self, prompt: list[int], params: SamplingParams) -> Completion:
        sampling = self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        final = None
        async for final in self.engine.generate({"prompt_token_ids": prompt}, sampling, request_id=uuid.uuid4().hex):
            pass
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for a request")
        out = final.outputs[0]
        return Completion(
            text=out.text,
            finish_reason="length" if out.finish_reason == "length" else "stop",
            prompt_tokens=len(prompt),
            completion_tokens=len(out.token_ids),
        )

    def shutdown(self) -> None:
        """Stop the engine's processes now rather than whenever the object is collected."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        engine.shutdown()
        # vLLM's __del__ shuts the engine down again. Collected here, while the modules it
        # calls still exist; left to interpreter exit, it raises a TypeError there.
        del engine
        gc.collect()
