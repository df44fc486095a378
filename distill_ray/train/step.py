"""One optimizer step: forward, backward and update over a rank's micro-batches.

Runs in any single process: inside a Ray Train worker on a DeepSpeed engine, or on one
GPU/CPU without Ray on a `LocalEngine` (benchmarks, tests). Both expose the same three
calls DeepSpeed defines: `engine(**inputs)`, `engine.backward(loss)` (which scales by
1/grad_accum) and `engine.step()` (which updates only at the accumulation boundary).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distill_ray.train.data import IGNORE_INDEX


@dataclass
class StepStats:
    loss: float  # mean over this rank's target tokens (row weights applied)
    target_tokens: int  # tokens that carried loss
    tokens: int  # non-padding tokens processed (throughput counts these)


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on labelled positions, each scaled by its row's weight.

    Normalised by the number of labelled tokens, not by the sum of weights, so a weight
    of 0.3 really makes a row count 0.3 times as much as a weight-1 row.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    mask = shift_labels != IGNORE_INDEX
    n = int(mask.sum())
    loss = (ce * weights.to(ce.dtype)[:, None] * mask).sum() / max(n, 1)
    return loss, n


def forward_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    device = engine.device
    out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return weighted_lm_loss(out.logits, batch["labels"].to(device), batch["weights"].to(device))


def train_step(engine, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepStats:
    """Accumulate gradients over `micro_batches` and take one optimizer step."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(
            f"got {len(micro_batches)} micro-batches, the engine accumulates over "
            f"{engine.gradient_accumulation_steps()}"
        )
    engine.train()
    loss_sum, targets, tokens = 0.0, 0, 0
    for batch in micro_batches:
        loss, n = forward_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach()) * n
        targets += n
        tokens += int(batch["attention_mask"].sum())
    return StepStats(loss=loss_sum / max(targets, 1), target_tokens=targets, tokens=tokens)


@dataclass
class LocalEngine:
    """A model + torch optimizer behaving like a DeepSpeed engine, in one process."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_accum: int = 1
    gradient_clipping: float | None = 1.0
    _micro: int = field(default=0, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def gradient_accumulation_steps(self) -> int:
        return self.grad_accum

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]
