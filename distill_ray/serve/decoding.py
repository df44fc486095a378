"""Batched autoregressive decoding where every row keeps its own sampling parameters.

A dynamic batch mixes requests with different max_tokens, temperature, top_p, stop and seed.
Rather than splitting it by parameters (one `generate` call per group), every row shares the
forward passes and only the token choice and the stopping test are per row. Rows are left
padded; the attention mask hides the padding and position ids count real tokens only, so a
row decodes exactly as it would alone.
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import torch

from distill_ray.serve.backend import Completion, FinishReason, SamplingParams


def _left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _generator(seed: int | None) -> torch.Generator:
    # Unseeded requests still get their own stream, so a seeded neighbour in the batch
    # neither affects them nor is affected by them.
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class _Row:
    """One request's progress through the batch."""

    def __init__(self, prompt_len: int, params: SamplingParams) -> None:
        self.prompt_len = prompt_len
        self.params = params
        self.generator = _generator(params.seed)
        self.tokens: list[int] = []
        self.text = ""
        self.finish: FinishReason | None = None
        self.logprob = 0.0  # of the chosen tokens under the model (temperature 1), summed

    def accept(self, token: int, logits: torch.Tensor, tokenizer, eos_ids: frozenset[int]) -> None:
        self.tokens.append(token)
        self.logprob += float(torch.log_softmax(logits, dim=-1)[token])
        if token in eos_ids:
            self.finish = "stop"
            return
        # Decoding the whole continuation each step is what makes a stop sequence that spans
        # several tokens (or a token that spans a stop boundary) cut at the right character.
        self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(self.text, self.params.stop)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish = "length"


def decode_batch(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    eos_ids: frozenset[int],
) -> list[Completion]:
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    rows = [_Row(len(p), sp) for p, sp in zip(prompts, params)]
    ids, mask = _left_pad(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are used; skipping the rest saves a vocab-sized matmul per prompt token.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    cache = None
    with torch.inference_mode():
        for _ in range(max(sp.max_tokens for sp in params)):
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
                **extra,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()
            next_ids = []
            for row, row_logits in zip(rows, logits):
                if row.finish is None:
                    row.accept(_sample(row_logits, row.params, row.generator), row_logits, tokenizer, eos_ids)
                    next_ids.append(row.tokens[-1])
                else:
                    next_ids.append(pad_id)  # finished rows ride along until the batch ends
            if all(row.finish for row in rows):
                break
            ids = torch.tensor(next_ids, dtype=torch.long).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
    return [
        Completion(
            text=row.text,
            finish_reason=row.finish or "length",
            prompt_tokens=row.prompt_len,
            completion_tokens=len(row.tokens),
            batch_size=len(rows),
            logprob=row.logprob,
        )
        for row in rows
    ]
