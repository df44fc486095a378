"""`train_loop_per_worker`: what every Ray Train worker runs.

The driver (trainer.py) passes one plain dict:
    cfg              Config.model_dump()
    planned_steps    optimizer steps of the whole run (fixes the LR schedule)
    tokenizer_files  {file name: bytes} of a tokenizer trained on the driver, or None
    tokenizer_source path / hub id to load the tokenizer from when no files are given
    init_from        a previous model dir to start from (weights only), or None
    init_checkpoint  a previous run's checkpoint dir to continue from (weights, LoRA adapter,
                     optimizer state; a fresh LR schedule and step counter), or None
    checkpoint_state JSON-able dict the caller wants in every checkpoint (a curriculum's
                     stage), or None
    lr_window        [offset, span]: this run is steps offset.. of one LR schedule over span
                     steps (a curriculum's stages), or None: the schedule spans this run
    mlflow           (tracking_uri, run_id) or None; rank 0 alone logs to it
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from distill_ray.config import Config
from distill_ray.train.checkpoint import (
    CALLER_STATE_KEY, MODEL_DIR, continue_from_checkpoint, load_checkpoint, save_checkpoint,
)
from distill_ray.train.data import BatchPlan, Batcher, canonical_order, collate, encode_rows, validate_rows
from distill_ray.train.engine import batch_geometry, build_engine
from distill_ray.train.prebuild import ensure_extensions_dir
from distill_ray.train.step import train_step


def load_tokenizer(config: dict[str, Any]):
    from transformers import AutoTokenizer

    files = config.get("tokenizer_files")
    if files:
        # Shipped as bytes, not as a path: a worker on another node cannot see the driver's disk.
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    else:
        tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_source"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class MlflowLogger:
    """Rank 0's handle on the driver's run; a tracking outage must not kill training."""

    def __init__(self, target: tuple[str, str] | None):
        self.client = self.run_id = None
        if target:
            import mlflow

            uri, self.run_id = target
            self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.warned = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from distill_ray.tracking import log_metrics

        try:
            log_metrics(self.client, self.run_id, metrics, step)
        except Exception as e:  # noqa: BLE001 -- any tracking failure is reported, never fatal
            if not self.warned:
                say(f"[train] warning: MLflow logging failed, continuing without it: {e}")
                self.warned = True


def say(message: str) -> None:
    # Straight to the worker's stdout, which Ray streams to the driver: Ray Train's patched
    # print() would also copy it into its logger, so every line would show up twice.
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def _read_rows() -> list[dict]:
    shard = ray.train.get_dataset_shard("train")
    if shard is None:
        raise ValueError("no 'train' dataset was given to the trainer")
    return canonical_order(validate_rows(shard.iter_rows()))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    entered = time.time()
    ensure_extensions_dir()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-save bars drown the step log
    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    if tc.use_gpu:
        # DeepSpeed places the engine on the current device; make it this worker's GPU.
        torch.cuda.set_device(ray.train.torch.get_device())
    else:
        # One thread per reserved CPU: more would fight the other workers on the same node.
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total = int(config["planned_steps"])

    tokenizer = load_tokenizer(config)
    encoded, truncated = encode_rows(tokenizer, _read_rows(), tc.max_seq_len)
    micro, _ = batch_geometry(tc, world)
    plan = BatchPlan(len(encoded), tc.batch_size, world, micro, seed=tc.seed)
    batcher = Batcher(plan, [len(e.input_ids) for e in encoded])

    init_checkpoint = config.get("init_checkpoint")
    built = build_engine(
        cfg, tokenizer, world, total, config.get("init_from"),
        architecture_from=os.path.join(init_checkpoint, MODEL_DIR) if init_checkpoint else None,
        lr_window=config.get("lr_window"),
    )
    engine = built.engine
    positions = getattr(engine.module.config, "max_position_embeddings", None)
    if positions and tc.max_seq_len > positions:
        raise ValueError(f"train.max_seq_len={tc.max_seq_len} exceeds the student's {positions} positions")

    state: dict[str, Any] = {"step": 0, "train_tokens": 0, "train_time_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # This run's own checkpoint wins over init_checkpoint: it already holds what that
        # one gave, plus this run's progress.
        with checkpoint.as_directory() as ckpt_dir:
            state.update(load_checkpoint(engine, ckpt_dir))
    elif init_checkpoint:
        previous = continue_from_checkpoint(engine, init_checkpoint)
        state["continued_from"] = {"checkpoint": init_checkpoint, "step": int(previous.get("step", 0))}
    state[CALLER_STATE_KEY] = config.get("checkpoint_state") or {}
    start = int(state["step"])
    state["resumed_from"] = start
    # A fault drill fires only on a run that did not resume, so the retry gets past it.
    fail_at = tc.inject_failure_at_step if checkpoint is None else None

    logger = MlflowLogger(config.get("mlflow") if rank == 0 else None)
    if rank == 0:
        resumed = f", resumed at step {start}" if start else ""
        if checkpoint is None and init_checkpoint:
            resumed += f", continuing from {init_checkpoint} (weights + optimizer state)"
        say(
            f"[train] {len(encoded)} rows ({truncated} targets truncated), {world} workers, "
            f"ZeRO-{tc.zero_stage}, batch {tc.batch_size} = {world}x{plan.grad_accum}x{micro}, "
            f"{total} steps{resumed}; set up in {time.time() - entered:.0f}s"
        )

    begin = window_start = time.time()
    window = torch.zeros(3, dtype=torch.float64)  # loss*targets, targets, tokens over the log window
    metrics: dict[str, float] = {}
    step, stopped_early = start, False
    while step < total:
        batches = [collate([encoded[i] for i in idx], tokenizer.pad_token_id) for idx in batcher.micro_batches(step, rank)]
        stats = train_step(engine, batches)
        step += 1
        over_budget = tc.time_budget_s is not None and state["train_time_s"] + time.time() - begin > tc.time_budget_s
        # One small all-reduce per step: global loss/token counts, and the stop decision,
        # so every rank leaves the loop at the same step (a lone rank would hang the rest).
        shared = torch.tensor(
            [stats.loss * stats.target_tokens, stats.target_tokens, stats.tokens, float(over_budget)],
            dtype=torch.float64,
            device=engine.device,  # NCCL reduces device tensors only
        )
        dist.all_reduce(shared)
        shared = shared.cpu()
        window += shared[:3]
        state["train_tokens"] += int(shared[2])
        stopped_early = bool(shared[3] > 0) and step < total

        if fail_at is not None and step == fail_at:
            _injected_failure(step)

        last = step == total or stopped_early
        if step % tc.log_every == 0 or last:
            now = time.time()
            metrics = {
                "loss": float(window[0] / max(window[1], 1)),
                "lr": float(engine.get_lr()[0]),
                "tokens_per_s": float(window[2] / max(now - window_start, 1e-9)),
                "epoch": step * tc.batch_size / len(encoded),
            }
            window.zero_()
            window_start = now
            if rank == 0:
                logger.log(metrics, step)
                say(
                    f"[train] step {step}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['tokens_per_s']:,.0f} tok/s epoch {metrics['epoch']:.2f} "
                    f"{state['train_time_s'] + now - begin:.0f}s"
                )
        if last or step % tc.checkpoint_every == 0:
            state.update(step=step, epoch=step * tc.batch_size / len(encoded), planned_steps=total)
            elapsed = state["train_time_s"] + time.time() - begin
            report = {**metrics, "step": step, "train_tokens": state["train_tokens"], "train_time_s": elapsed,
                      "stopped_early": float(stopped_early)}
            _report(engine, tokenizer, {**state, "train_time_s": elapsed}, report, final=last)
        if stopped_early:
            if rank == 0:
                say(f"[train] time budget of {tc.time_budget_s:.0f}s reached at step {step}/{total}")
            break

    if start >= total:
        # Resumed from the final checkpoint of a finished run: report it again so the run
        # ends with metrics and a checkpoint, without training past its plan.
        _report(engine, tokenizer, state, {"step": start, "train_tokens": state["train_tokens"]}, final=True)


def _injected_failure(step: int) -> None:
    # Ray Train commits a reported checkpoint only once its controller has polled every
    # rank's report (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a crash
    # within that window loses the checkpoint and the retry starts from scratch. A drill
    # models a crash after the commit, so it idles through a few polls before it fires.
    interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
    time.sleep(3 * interval)
    raise RuntimeError(f"injected failure at step {step} (train.inject_failure_at_step)")


def _report(engine, tokenizer, state: dict[str, Any], metrics: dict[str, float], final: bool) -> None:
    # Each rank writes its own part (rank 0 the weights, every rank its optimizer shard);
    # Ray Train merges the parts into one checkpoint directory in storage.
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(engine, tokenizer, tmp, state, final=final)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

