"""LoRA multiplexing on the CPU backend: one base model per replica, adapters picked per request.

The base weights are loaded once; every adapter is loaded into the same PEFT model next
to it (a few MB each against a base of GBs on a real student), and a request names the
adapter it wants. A dynamic batch may mix adapters: it is decoded one adapter group after
another on the same base (PEFT switches the active adapter in place, no copy), so requests
for different adapters still share the replica's queue and never wait for a reload.

Adapters on disk: `<model_dir>/adapters/<name>/` (a PEFT adapter dir), listed in
`<model_dir>/adapters.json` as {name: relative dir}; `model_dir` itself is the base.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import defaultdict
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

ADAPTERS_FILE = "adapters.json"

# Base-model loads in this process: a replica that holds its base once reads 1 however
# many adapters it serves (the serving tests assert exactly that through `stats`).
_BASE_LOADS = 0
_LOADS_LOCK = threading.Lock()


def read_adapters(model_dir: str) -> dict[str, str]:
    """{adapter name: absolute adapter dir} of a multiplexed model dir; ValueError naming what is wrong."""
    path = os.path.join(model_dir, ADAPTERS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: no {ADAPTERS_FILE}; not a base with adapters")
    with open(path) as f:
        listed = json.load(f)
    if not isinstance(listed, dict) or not listed:
        raise ValueError(f"{path}: expected a non-empty mapping of adapter name to adapter dir")
    out = {}
    for name, rel in listed.items():
        adapter_dir = os.path.join(model_dir, rel)
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(f"{path}: adapter {name!r} at {adapter_dir} has no adapter_config.json")
        out[name] = adapter_dir
    return out


def write_adapters(model_dir: str, adapters: dict[str, str]) -> None:
    """List adapters (dirs inside `model_dir`) in its `adapters.json`."""
    rel = {name: os.path.relpath(path, model_dir) for name, path in adapters.items()}
    bad = [name for name, r in rel.items() if r.startswith("..")]
    if bad:
        raise ValueError(f"adapters {bad} must live inside {model_dir}")
    with open(os.path.join(model_dir, ADAPTERS_FILE), "w") as f:
        json.dump(rel, f, indent=2)


def _load_base(model_dir: str):
    global _BASE_LOADS
    model, tokenizer = load_pretrained(model_dir)
    with _LOADS_LOCK:
        _BASE_LOADS += 1
    return model, tokenizer


@dataclass(frozen=True)
class _Pending:
    adapter: str
    prompt: list[int]
    params: SamplingParams


class AdapterBackend:
    """The transformers backend's job for several LoRA adapters on one base."""

    def __init__(self, model_dir: str, adapters: dict[str, str], cfg: ServeConfig, threads: int | None = None) -> None:
        from peft import PeftModel

        if not adapters:
            raise ValueError("AdapterBackend: no adapters to serve")
        if threads:
            torch.set_num_threads(threads)  # see TransformersBackend
        base, self.tokenizer = _load_base(model_dir)
        self._base_id = id(base)
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
        self.model = model
        # The wrapped model, LoRA layers injected: it runs whichever adapter is active, and
        # its forward takes `logits_to_keep`, which PeftModel's generic signature hides.
        self._net = model.get_base_model()
        self._eos_ids = eos_token_ids(base, self.tokenizer)
        context = context_length(base.config, self.tokenizer)
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self._info = {name: ModelInfo(name, adapters[name], context, chat) for name in names}
        self._lock = threading.Lock()
        self._decode_queued.set_max_batch_size(cfg.max_batch_size)
        self._decode_queued.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def adapter_names(self) -> list[str]:
        return list(self._info)

    def model_info(self, adapter: str) -> ModelInfo:
        return self._info[adapter]

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def stats(self) -> dict:
        """What the replica holds: base loads in this process, and which base each adapter runs on."""
        bases = {name: id(self.model.get_base_model()) for name in self._info}
        return {"base_loads": _BASE_LOADS, "base_id": self._base_id, "adapter_base_ids": bases,
                "adapters": self.adapter_names()}

    async def generate(self, adapter: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        if adapter not in self._info:
            raise KeyError(f"no adapter {adapter!r} (serving {', '.join(self._info)})")
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return list(await asyncio.gather(*(self._decode_queued(_Pending(adapter, list(p), sp)) for p, sp in zip(prompts, params))))

    def _decode_groups(self, pending: list[_Pending]) -> list[Completion]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(pending):
            groups[p.adapter].append(i)
        out: list[Completion | None] = [None] * len(pending)
        # One batch at a time per replica (Serve's batch queue), but the lock also keeps a
        # direct caller from switching the adapter under a running group.
        with self._lock, torch.inference_mode():
            for adapter, rows in groups.items():
                self.model.set_adapter(adapter)
                done = decode_batch(self._net, self.tokenizer, [pending[i].prompt for i in rows],
                                    [pending[i].params for i in rows], self._eos_ids)
                for i, c in zip(rows, done):
                    out[i] = c
        return out  # type: ignore[return-value]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def _decode_queued(self, pending: list[_Pending]) -> list[Completion]:
        return await asyncio.to_thread(self._decode_groups, pending)
