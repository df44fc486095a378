"""The strategy seam: model + config -> a DeepSpeed engine.

Every `zero_stage` goes through DeepSpeed, on CPU (gloo + its shared-memory op) and GPU
alike; stage 0 is DeepSpeed's plain data parallelism (full replicas, all-reduced
gradients), 1/2 shard optimizer state / gradients, 3 also shards parameters. The global
batch is `train.batch_size` = workers x grad_accum x micro_batch_size.

The optimizer is torch's AdamW handed to `deepspeed.initialize`: DeepSpeed's own Adam
variants need a JIT C++/CUDA build (minutes on CPU) and buy nothing at these sizes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from distill_ray.config import Config, LoraConfig, StudentConfig, TrainConfig
from distill_ray.train.student import TinySpec, tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def batch_geometry(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size per worker, grad_accum) for the configured global batch."""
    per_worker, rest = divmod(train.batch_size, world_size)
    if rest or per_worker == 0:
        raise ValueError(f"train.batch_size={train.batch_size} must be a positive multiple of train.num_workers={world_size}")
    micro = train.micro_batch_size or per_worker
    if per_worker % micro:
        raise ValueError(
            f"train.micro_batch_size={micro} must divide the per-worker batch "
            f"(batch_size {train.batch_size} / {world_size} workers = {per_worker})"
        )
    return micro, per_worker // micro


def deepspeed_config(train: TrainConfig, student: StudentConfig, world_size: int) -> dict[str, Any]:
    micro, accum = batch_geometry(train, world_size)
    if train.offload_params and train.zero_stage != 3:
        raise ValueError(f"train.offload_params needs train.zero_stage=3 (got {train.zero_stage})")
    if train.offload_optimizer and train.zero_stage == 0:
        raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if train.zero_stage == 3:
        # Lets checkpoint.full_state_dict gather the sharded weights for save_pretrained.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": student.dtype == "bfloat16"},
        "fp16": {"enabled": student.dtype == "float16"},
        # Our optimizer is torch's AdamW, which DeepSpeed calls "untested" with ZeRO and
        # refuses with offload unless told that is intended.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves, on rank 0 only
        "wall_clock_breakdown": False,
    }


def warmup_cosine(warmup_steps: int, total_steps: int, offset: int = 0):
    """LR multiplier: linear warm-up, then cosine decay to zero at `total_steps`.

    With `offset` the run is a segment of a longer schedule: its step s takes the value of
    step offset + s (a curriculum's stages share one schedule that way).
    """

    def factor(step: int) -> float:
        step += offset
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, train: TrainConfig, total_steps: int, lr_window: tuple[int, int] | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (LoRA target_modules matched nothing?)")
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    offset, span = lr_window or (0, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, span, offset))
    return optimizer, scheduler


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ValueError(f"student.lora.target_modules: {missing} not found in the model")
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def load_student_model(
    cfg: Config, tokenizer, init_from: str | None = None, *, architecture_from: str | None = None
) -> torch.nn.Module:
    """The model to fine-tune: a previous stage's output, a hub/local model, or a tiny one.

    `architecture_from`: a saved model dir whose config alone is used, weights left
    initialised: the caller loads them from a training checkpoint next (so they are not
    read twice, and a LoRA run gets back its original base rather than the merged export).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.student.dtype]
    if architecture_from:
        # from_config, so a live ZeRO-3 config builds it already sharded.
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(architecture_from), dtype=dtype)
    source = init_from or cfg.student.model
    if source:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return tiny_model(tokenizer, TinySpec(**cfg.student.tiny.model_dump()), seed=cfg.seed)


@dataclass
class Built:
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict[str, Any]
    # transformers finds the ZeRO-3 config through a weak reference: it must outlive the
    # model's construction and every later gather, so the caller keeps this alive.
    hf_ds_config: Any = None


def build_engine(
    cfg: Config,
    tokenizer,
    world_size: int,
    total_steps: int,
    init_from: str | None = None,
    *,
    architecture_from: str | None = None,
    lr_window: tuple[int, int] | None = None,
) -> Built:
    """Model (ZeRO-3: constructed already sharded) -> optional LoRA -> DeepSpeed engine.

    With `architecture_from` the weights are left for a checkpoint load (load_student_model);
    `lr_window` = (offset, span) places this run inside a longer LR schedule (warmup_cosine).
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    import torch.distributed as dist

    # DeepSpeed's comm layer must wrap the process group Ray Train (or the caller) set up
    # before the model is built: ZeRO-3's sharded construction sizes the world from it.
    if dist.is_initialized():
        if dist.get_world_size() == 1:
            # A one-process group needs no launcher; ZeRO-3 and offload still read this.
            os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    ds_config = deepspeed_config(cfg.train, cfg.student, world_size)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.train.zero_stage == 3 else None
    model = load_student_model(cfg, tokenizer, init_from, architecture_from=architecture_from)
    if cfg.student.lora.enabled:
        model = apply_lora(model, cfg.student.lora)
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps, lr_window)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return Built(engine=engine, ds_config=ds_config, hf_ds_config=hf_ds_config)
