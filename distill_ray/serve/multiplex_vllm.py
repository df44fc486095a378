"""LoRA multiplexing on the GPU backend: vLLM's own LoRA support behind `AdapterBackend`'s interface.

vLLM keeps the base once and applies each request's adapter inside its batches
(`LoRARequest`); the engine is started with `enable_lora` and room for every adapter.
`vllm` is imported only here, when this backend is built. Tested on vLLM's CPU build
(tests/test_vllm_serve.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Sequence

from distill_ray.config import ServeConfig
from distill_ray.serve.backend import Completion, ModelInfo, SamplingParams
from distill_ray.serve.backend_vllm import VllmBackend, _import_vllm


def _max_rank(adapters: dict[str, str]) -> int:
    ranks = []
    for path in adapters.values():
        with open(os.path.join(path, "adapter_config.json")) as f:
            ranks.append(int(json.load(f).get("r", 8)))
    return max(ranks)


class VllmAdapterBackend:
    def __init__(self, model_dir: str, adapters: dict[str, str], cfg: ServeConfig) -> None:
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        lora_args = {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": _max_rank(adapters)}
        self._engine = VllmBackend(model_dir, cfg.model_copy(update={"vllm": {**lora_args, **cfg.vllm}}))
        self._vllm = vllm
        # LoRA ids start at 1: vLLM reserves 0 for "no adapter".
        self._requests = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(adapters.items(), start=1)}
        base = self._engine.model_info()
        self._info = {name: ModelInfo(name, adapters[name], base.context_length, base.has_chat_template) for name in adapters}

    def adapter_names(self) -> list[str]:
        return list(self._info)

    def model_info(self, adapter: str) -> ModelInfo:
        return self._info[adapter]

    def encode(self, prompt) -> list[int]:
        return self._engine.encode(prompt)

    def stats(self) -> dict:
        return {"base_loads": 1, "adapters": self.adapter_names(), "backend": "vllm"}

    async def generate(self, adapter: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        if adapter not in self._requests:
            raise KeyError(f"no adapter {adapter!r} (serving {', '.join(self._requests)})")
        return list(await asyncio.gather(*(self._one(adapter, list(p), sp) for p, sp in zip(prompts, params))))

    async def _one(self, adapter: str, prompt: list[int], params: SamplingParams) -> Completion:
        sampling = self._vllm.SamplingParams(n=1, max_tokens=params.max_tokens, temperature=params.temperature,
                                             top_p=params.top_p, stop=list(params.stop) or None, seed=params.seed)
        final = None
        async for final in self._engine.engine.generate({"prompt_token_ids": prompt}, sampling, request_id=uuid.uuid4().hex,
                                                        lora_request=self._requests[adapter]):
            pass
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for a request")
        out = final.outputs[0]
        return Completion(text=out.text, finish_reason="length" if out.finish_reason == "length" else "stop",
                          prompt_tokens=len(prompt), completion_tokens=len(out.token_ids))

    def shutdown(self) -> None:
        self._engine.shutdown()
