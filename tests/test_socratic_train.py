"""Socratic CoT's training schedule through the real trainer: a base on both roles' rows,
then a decomposer and a solver adapter from it, assembled into one servable pair dir.

Real Ray Train + DeepSpeed on CPU (one worker, a few steps each), a real `mlflow server`.
Serving and evaluating such a dir are in test_socratic.py.
"""
from __future__ import annotations

import dataclasses
import json
import os

import mlflow
import pytest
import ray
import torch

from distill_ray.config import Config, TinyStudent
from distill_ray.methods.recipe import MethodContext, TrainJob
from distill_ray.methods.socratic import role_rows, train_pair
from distill_ray.methods.socratic_format import DECOMPOSER, DONE, SOLVER
from distill_ray.serve.multiplex import read_adapters
from distill_ray.tasks.synthetic import generate


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_base_then_two_adapters_into_one_pair_dir(tmp_path, ray_runtime, mlflow_server):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train, _ = generate(48, 0, seed=1)
    teacher = {ex.id: {"decomposition": json.dumps([dataclasses.asdict(s) for s in ex.decomposition])} for ex in train[:-4]}
    cfg = Config(run_name="soc-train")
    cfg.student.tiny = TinyStudent(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=256)
    t = cfg.train
    t.num_workers, t.batch_size, t.max_steps, t.warmup_steps, t.checkpoint_every, t.log_every = 1, 8, 8, 1, 100, 1
    cfg.method.socratic.adapter_rank = 4
    ctx = MethodContext(cfg, {"decompositions": teacher})

    decomposer, solver = role_rows(train, ctx)
    assert len(solver) == sum(len(ex.decomposition) for ex in train[:-4])  # one row per step; no chain, no rows
    assert len(decomposer) == len(solver) + len(train) - 4 and sum(r.target == f" {DONE}" for r in decomposer) == len(train) - 4

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("socratic-train")
    run = client.create_run(exp, run_name="soc-train/train")
    result = train_pair(TrainJob(ctx, train, str(tmp_path / "train"), (mlflow_server.uri, run.info.run_id)))

    # Budget: the steps a plain run would take, half to the base, the rest split by the adapters.
    assert (result.metrics["base_steps"], result.metrics["adapter_steps"], result.steps) == (4, 2, 8)
    assert result.metrics["decomposer_rows"] == len(decomposer) and result.metrics["tokens_per_s"] > 0
    pair = result.model_dir
    assert pair == str(tmp_path / "train" / "socratic-pair") and os.path.isfile(os.path.join(pair, "config.json"))
    adapters = read_adapters(pair)
    assert set(adapters) == {DECOMPOSER, SOLVER} and all(p.startswith(pair) for p in adapters.values())

    # The pair's base is the base run's export, bit for bit; each adapter is trained (LoRA B
    # starts at zero) and differs from the other.
    base_run = tmp_path / "train" / "socratic-base"
    (base_ckpt,) = [d for d in base_run.glob("checkpoint_*") if (d / "model" / "config.json").is_file()][-1:]
    got, want = load_file(os.path.join(pair, "model.safetensors")), load_file(str(base_ckpt / "model" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair), adapters[DECOMPOSER], adapter_name=DECOMPOSER)
    model.load_adapter(adapters[SOLVER], adapter_name=SOLVER)
    lora_b = {name: torch.cat([p.flatten() for n, p in model.named_parameters() if f"lora_B.{name}." in n])
              for name in (DECOMPOSER, SOLVER)}
    assert all(b.abs().sum() > 0 for b in lora_b.values()) and not torch.equal(lora_b[DECOMPOSER], lora_b[SOLVER])
    assert json.load(open(os.path.join(adapters[SOLVER], "adapter_config.json")))["r"] == 4

    # One MLflow child run per part, each with its loss history.
    children = {r.data.tags["socratic_part"]: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert set(children) == {"base", DECOMPOSER, SOLVER}
    assert all(client.get_metric_history(r.info.run_id, "loss") for r in children.values())

    from distill_ray.serve.socratic_app import build_socratic_app

    build_socratic_app(cfg, pair)  # the recipe's serve_app accepts what its train hook wrote
