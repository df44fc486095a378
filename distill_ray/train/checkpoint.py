"""Checkpoint layout, save/resume, and the final export.

A checkpoint directory (one per report, merged by Ray Train from every rank's files):
    deepspeed/          engine.save_checkpoint: weights, each rank's optimizer shard,
                        LR scheduler, and `client_state` (our train state)
    model/              a plain HF dir (config, weights, tokenizer) loadable with
                        AutoModelForCausalLM / AutoTokenizer -- when training without LoRA,
                        and always in the final checkpoint
    adapter/            with LoRA: the PEFT adapter (+ tokenizer) for multiplexed serving
    train_state.json    {step, epoch, planned_steps, checkpoint_state, ...}, readable
                        without torch; `checkpoint_state` is whatever the caller of
                        run_training asked to carry (a curriculum's stage and schedule)

With LoRA the final export holds both: `model/` is the adapter merged into its base
(one self-contained model every consumer can load), `adapter/` is kept for serving
many adapters on one base.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

DS_DIR = "deepspeed"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
STATE_FILE = "train_state.json"
STATE_KEY = "distill_ray_train_state"  # our entry in DeepSpeed's client_state
CALLER_STATE_KEY = "checkpoint_state"  # inside the train state: the caller's own state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The complete weights on rank 0, None elsewhere. Collective under ZeRO-3: call on all ranks."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if _rank() == 0 else None


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def save_checkpoint(engine, tokenizer, out_dir: str, state: dict[str, Any], final: bool = False) -> None:
    """Write this rank's part of a resumable checkpoint into `out_dir`. Call on every rank.

    `final` also writes the export (`model/` as a plain HF dir, merged under LoRA).
    """
    engine.save_checkpoint(os.path.join(out_dir, DS_DIR), client_state={STATE_KEY: state})
    if final:
        export_model(engine, tokenizer, out_dir)
    else:
        state_dict = full_state_dict(engine)
        if _rank() == 0:
            path = os.path.join(out_dir, ADAPTER_DIR if _is_peft(engine.module) else MODEL_DIR)
            engine.module.save_pretrained(path, state_dict=state_dict)
            tokenizer.save_pretrained(path)
    if _rank() == 0:
        write_state(out_dir, state)


def load_checkpoint(engine, ckpt_dir: str) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler; returns the saved train state."""
    ds_dir = os.path.join(ckpt_dir, DS_DIR)
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a training checkpoint: no {DS_DIR}/ inside")
    path, client_state = engine.load_checkpoint(ds_dir)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ds_dir}")
    if not client_state or STATE_KEY not in client_state:
        raise RuntimeError(f"the checkpoint in {ds_dir} carries no train state; it was not written by this trainer")
    return dict(client_state[STATE_KEY])


def is_training_checkpoint(path: str) -> bool:
    """A directory this trainer wrote as a checkpoint (DeepSpeed state + train state)."""
    return os.path.isdir(os.path.join(path, DS_DIR)) and os.path.isfile(os.path.join(path, STATE_FILE))


def continue_from_checkpoint(engine, ckpt_dir: str) -> dict[str, Any]:
    """Start a new run from another run's checkpoint: weights (LoRA adapter included) and
    optimizer moments, but the new run's own LR schedule and step counter.

    Returns the previous run's train state. Call on every rank.
    """
    ds_dir = os.path.join(ckpt_dir, DS_DIR)
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a training checkpoint: no {DS_DIR}/ inside")
    path, client_state = engine.load_checkpoint(ds_dir, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ds_dir}")
    # The optimizer's param groups come back with the LR the previous run ended on
    # (near zero at the end of a cosine); the fresh schedule's first value applies instead.
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    # DeepSpeed restores its own counters too; this run counts from zero.
    engine.global_steps = engine.global_samples = engine.skipped_steps = 0
    return dict((client_state or {}).get(STATE_KEY, {}))


def read_checkpoint_state(ckpt_dir: str) -> dict[str, Any]:
    """The `checkpoint_state` run_training carried into this checkpoint ({} if none)."""
    return dict(read_state(ckpt_dir).get(CALLER_STATE_KEY) or {})


def write_state(out_dir: str, state: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)


def read_state(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return json.load(f)


def _merged_model(peft_module, state_dict: dict[str, torch.Tensor]):
    """A fresh base model with the trained adapter folded into its weights.

    Built on the meta device from the base's class and config (the constructor, not
    from_config, so a live ZeRO-3 config does not shard it), then filled with the
    gathered weights: the training model itself is left untouched and may be sharded.
    """
    from peft import get_peft_model

    base = peft_module.get_base_model()
    with torch.device("meta"):
        skeleton = get_peft_model(type(base)(base.config), peft_module.peft_config["default"])
    # Copies: below ZeRO-3 the state dict aliases the live parameters, and assigning them
    # would let merge_and_unload fold the adapter into the training model's own base weights.
    # Tied weights (embeddings / LM head) share one copy, or the export would come out untied.
    copies: dict[tuple, torch.Tensor] = {}
    own = {}
    for k, v in state_dict.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key not in copies:
            copies[key] = v.detach().clone()
        own[k] = copies[key]
    missing, unexpected = skeleton.load_state_dict(own, strict=False, assign=True)
    weights_missing = [k for k in missing if not k.endswith("inv_freq")]
    if weights_missing or unexpected:
        raise RuntimeError(f"adapter merge: missing {weights_missing[:5]}, unexpected {list(unexpected)[:5]}")
    merged = skeleton.merge_and_unload()
    merged.tie_weights()
    return merged


def export_model(engine, tokenizer, out_dir: str) -> None:
    """Final export: `model/` as a plain HF dir (+ `adapter/` with LoRA). Call on every rank."""
    state_dict = full_state_dict(engine)
    if _rank() != 0:
        return
    module = engine.module
    model_path = os.path.join(out_dir, MODEL_DIR)
    if _is_peft(module):
        adapter_path = os.path.join(out_dir, ADAPTER_DIR)
        module.save_pretrained(adapter_path, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_path)
        _merged_model(module, state_dict).save_pretrained(model_path)
    else:
        module.save_pretrained(model_path, state_dict=state_dict)
    tokenizer.save_pretrained(model_path)
