"""`run_training`: the driver side of one fine-tuning run on Ray Train.

Rerunning with the same `output_dir` + `name` resumes from the run's latest checkpoint
(Ray Train restores its own state from storage); so does a worker failure within
`train.max_failures`.

A run can start from a saved model dir (weights only) or continue another run's
checkpoint (weights, LoRA adapter and optimizer state, with its own fresh LR schedule
and step counter): chained curriculum stages do the latter. Whatever `checkpoint_state`
the caller passes is written into every checkpoint (`checkpoint.read_checkpoint_state`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distill_ray.config import Config
from distill_ray.train.checkpoint import ADAPTER_DIR, MODEL_DIR, is_training_checkpoint
from distill_ray.train.data import canonical_order, planned_steps, validate_rows
from distill_ray.train.engine import deepspeed_config
from distill_ray.train.loop import train_loop_per_worker
from distill_ray.train.student import train_tokenizer

REQUIRED_COLUMNS = ("prompt", "target")


@dataclass
class TrainResult:
    model_dir: str  # plain HF dir with tokenizer (LoRA merged in)
    checkpoint_path: str  # the final checkpoint; resumable, holds model_dir
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: str | None = None  # with LoRA: the adapter alone, for multiplexed serving


def _as_dataset(rows: ray.data.Dataset | Sequence[dict]) -> ray.data.Dataset:
    if isinstance(rows, ray.data.Dataset):
        names = set(rows.schema().names) if rows.schema() is not None else set()
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"training dataset lacks column(s) {missing}; it has {sorted(names)}")
        # Run pending transforms now, while the CPUs are free: once the workers hold them
        # all, a lazy read inside the training loop could wait forever for a slot.
        return rows.materialize()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(f"rows must be a ray.data.Dataset or a list of dicts, got {type(rows).__name__}")
    valid = validate_rows(rows)
    if not valid:
        raise ValueError("training data is empty: no rows to train on")
    return ray.data.from_items(valid)


def _check(cfg: Config, total: int) -> None:
    deepspeed_config(cfg.train, cfg.student, cfg.train.num_workers)  # raises on a bad batch/offload combination
    fail_at = cfg.train.inject_failure_at_step
    if fail_at is not None and not cfg.train.checkpoint_every < fail_at < total:
        raise ValueError(
            f"train.inject_failure_at_step={fail_at} must lie after the first checkpoint "
            f"(checkpoint_every={cfg.train.checkpoint_every}) and before the last step ({total}), "
            "or the retry could not get past it"
        )
    if cfg.student.model is None and cfg.train.max_seq_len > cfg.student.tiny.max_positions:
        raise ValueError(
            f"train.max_seq_len={cfg.train.max_seq_len} exceeds student.tiny.max_positions={cfg.student.tiny.max_positions}"
        )


def _tokenizer_files(cfg: Config, dataset: ray.data.Dataset, run_root: str, name: str) -> dict[str, bytes] | None:
    """The tiny student's tokenizer, trained here once and reused by a resumed run."""
    if cfg.student.model is not None:
        return None
    tok_dir = os.path.join(run_root, f"{name}.tokenizer")
    if not os.path.isdir(tok_dir):
        # Sorted, so the same rows give the same tokenizer whatever order Ray Data yields.
        rows = canonical_order(validate_rows(dataset.iter_rows()))
        texts = [t for r in rows for t in (r["prompt"], r["target"])]
        train_tokenizer(texts, vocab_size=cfg.student.tiny.vocab_size).save_pretrained(tok_dir)
    return {n: open(os.path.join(tok_dir, n), "rb").read() for n in sorted(os.listdir(tok_dir))}


def _init_source(init_from: str | None) -> tuple[str | None, str | None]:
    """(model dir, checkpoint dir) for `init_from`: exactly one is set, or neither."""
    if init_from is None:
        return None, None
    if os.path.isfile(os.path.join(init_from, "config.json")):
        return init_from, None
    if is_training_checkpoint(init_from):
        model_dir = os.path.join(init_from, MODEL_DIR)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            # Its config and tokenizer come from model/, which a LoRA run writes only at the end.
            raise ValueError(f"init_from={init_from!r}: a checkpoint without {MODEL_DIR}/ (use the run's final checkpoint)")
        return None, init_from
    raise ValueError(
        f"init_from={init_from!r} is not a saved model dir (no config.json) nor a training "
        "checkpoint (no deepspeed/ and train_state.json)"
    )


def _caller_state(checkpoint_state: dict | None) -> dict:
    if checkpoint_state is None:
        return {}
    if not isinstance(checkpoint_state, dict):
        raise ValueError(f"checkpoint_state must be a dict, got {type(checkpoint_state).__name__}")
    try:
        # Round-tripped now: it is written as JSON into every checkpoint, mid-run.
        return json.loads(json.dumps(checkpoint_state))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint_state must be JSON-serialisable: {e}") from None


def _local_dir(checkpoint, run_root: str) -> str:
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(os.path.join(run_root, "final_checkpoint"))


def run_training(
    cfg: Config,
    rows: ray.data.Dataset | Sequence[dict],
    *,
    output_dir: str,
    name: str = "train",
    mlflow_target: tuple[str, str] | None = None,
    init_from: str | None = None,
    checkpoint_state: dict | None = None,
    lr_window: tuple[int, int] | None = None,
) -> TrainResult:
    """Fine-tune the student on `rows` ({prompt, target, weight?}) with Ray Train + DeepSpeed.

    `output_dir` is the storage path (local dir or URI); `init_from` a previous
    TrainResult.model_dir (weights only) or TrainResult.checkpoint_path (weights,
    adapter and optimizer state; curriculum stages chain this way) -- a path every
    worker can read; `checkpoint_state` a JSON-able dict saved in every checkpoint;
    `mlflow_target` = (tracking_uri, run_id) of a run the driver already created;
    `lr_window` = (offset, span) when this run is one segment of a longer LR schedule.
    """
    init_model, init_checkpoint = _init_source(init_from)
    carried = _caller_state(checkpoint_state)
    remote = "://" in output_dir
    if remote and cfg.student.model is None and init_from is None:
        raise ValueError("output_dir must be a local dir when the tiny student's tokenizer is trained here")
    storage = output_dir if remote else os.path.abspath(output_dir)
    # Where driver-side files go: the storage dir itself, or a scratch dir next to a URI.
    run_root = tempfile.mkdtemp(prefix=f"{name}-") if remote else storage
    os.makedirs(run_root, exist_ok=True)

    dataset = _as_dataset(rows)
    num_rows = dataset.count()
    if num_rows == 0:
        raise ValueError("training data is empty: no rows to train on")
    total = planned_steps(num_rows, cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps)
    _check(cfg, total)

    files = None if init_from else _tokenizer_files(cfg, dataset, run_root, name)
    loop_config = {
        "cfg": cfg.model_dump(),
        "planned_steps": total,
        "tokenizer_files": files,
        "tokenizer_source": init_model or (os.path.join(init_checkpoint, MODEL_DIR) if init_checkpoint else cfg.student.model),
        "init_from": init_model,
        "init_checkpoint": init_checkpoint,
        "checkpoint_state": carried,
        "lr_window": lr_window,
        "mlflow": tuple(mlflow_target) if mlflow_target else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=storage,
            name=name,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        # Every worker reads all rows and takes its own slice of each batch (data.py):
        # exact epochs, equal step counts and deterministic resume, for row counts a
        # distillation set has (text, tens of thousands of rows).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    start = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    ckpt_dir = _local_dir(result.checkpoint, run_root)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics["fit_wall_s"] = time.time() - start
    adapter = os.path.join(ckpt_dir, ADAPTER_DIR)
    return TrainResult(
        model_dir=os.path.join(ckpt_dir, MODEL_DIR),
        checkpoint_path=ckpt_dir,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        adapter_dir=adapter if os.path.isdir(adapter) else None,
    )
