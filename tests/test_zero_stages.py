"""Every ZeRO configuration the CPU path supports, through `build_engine` in one process
without Ray: a single-rank gloo group per case, torn down after it.

Each case trains the tiny student on a repeated batch and must follow the update plain
torch computes from the same weights (LocalEngine, no DeepSpeed), resume from the
project's checkpoint into a fresh engine (weights, optimizer and LR schedule alike), and
export a plain HF model giving the engine's logits.
"""
from __future__ import annotations

import time

import deepspeed.comm
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses, ZeroParamStatus
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from distill_ray.config import Config
from distill_ray.train.checkpoint import MODEL_DIR, full_state_dict, load_checkpoint, read_state, save_checkpoint
from distill_ray.train.data import collate, encode_rows, validate_rows
from distill_ray.train.engine import build_engine, build_optimizer, deepspeed_config, warmup_cosine
from distill_ray.train.prebuild import prebuild
from distill_ray.train.step import LocalEngine, train_step
from distill_ray.train.student import train_tokenizer
from rows import arithmetic_rows
from tiny import TRAIN_SPEC, free_port

STEPS = 8
TOTAL = STEPS + 4  # the LR schedule's length: still above zero after the resumed step

CASES = {
    "zero0": {"zero_stage": 0},
    "zero1": {"zero_stage": 1},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero1+offload_optimizer": {"zero_stage": 1, "offload_optimizer": True},
    "zero2+offload_optimizer": {"zero_stage": 2, "offload_optimizer": True},
    "zero3+offload_optimizer": {"zero_stage": 3, "offload_optimizer": True},
    "zero3+offload_params": {"zero_stage": 3, "offload_params": True},
    "zero3+offload_params+offload_optimizer": {"zero_stage": 3, "offload_params": True, "offload_optimizer": True},
}


def _config(seed: int = 0, **train) -> Config:
    # 8 rows a step in 2 micro-batches of 4: gradient accumulation is exercised too.
    base = {"num_workers": 1, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 2,
            "max_seq_len": 64}
    return Config.model_validate({"train": {**base, **train}, "student": {"tiny": TRAIN_SPEC}, "seed": seed})


@pytest.fixture(scope="module")
def data():
    prebuild()  # the comm op from the virtualenv's cache, not a fresh JIT build
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # at these sizes more threads only contend
    rows = arithmetic_rows(8)
    tokenizer = train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], vocab_size=TRAIN_SPEC["vocab_size"])
    encoded, _ = encode_rows(tokenizer, validate_rows(rows), max_len=64)
    micro = [collate(encoded[:4], tokenizer.pad_token_id), collate(encoded[4:], tokenizer.pad_token_id)]
    yield tokenizer, micro
    torch.set_num_threads(threads)



@pytest.fixture
def process_group(monkeypatch):
    """A one-rank gloo world set up the way a launcher (torchrun, Ray Train) would."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    # DeepSpeed's own teardown: it also drops the groups it cached from this world, which
    # the next case's world would otherwise be handed.
    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    # A failed case's traceback keeps its engine alive, and with it a ZeRO-3 config that
    # would make the next case build its model sharded.
    unset_hf_deepspeed_config()


def _clone(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def _reference_losses(engine, cfg: Config, micro, steps: int) -> list[float]:
    """Plain torch from the engine's initial weights: the update every ZeRO config must reproduce."""
    module = engine.module
    model = type(module)(module.config)  # the constructor: never sharded, even under a live ZeRO-3 config
    model.load_state_dict(_clone(full_state_dict(engine)))
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps=TOTAL)
    local = LocalEngine(model, optimizer, scheduler, grad_accum=len(micro), gradient_clipping=cfg.train.grad_clip)
    return [train_step(local, micro).loss for _ in range(steps)]


def _offloads(engine) -> tuple[bool, bool]:
    """(optimizer, parameters) offloaded, as the ZeRO optimizer DeepSpeed built runs them."""
    # Offload included, the update is torch's AdamW: DeepSpeedCPUAdam would need a JIT build.
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        assert opt is engine.basic_optimizer  # plain data parallelism: no ZeRO wrapper
        return False, False
    if engine.zero_optimization_stage() < 3:
        return opt.cpu_offload, False
    return opt.offload_optimizer, opt.offload_param


def _logits(engine, batch) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_zero_config_trains_resumes_and_exports(case, data, process_group, tmp_path):
    tokenizer, micro = data
    train = CASES[case]
    stage3 = train["zero_stage"] == 3
    cfg = _config(**train)
    started = time.time()

    constructed_under_init = InsertPostInitMethodToModuleSubClasses.num_module_parameters
    built = build_engine(cfg, tokenizer, world_size=1, total_steps=TOTAL)
    engine = built.engine
    constructed_under_init = InsertPostInitMethodToModuleSubClasses.num_module_parameters - constructed_under_init

    assert engine.zero_optimization_stage() == train["zero_stage"]
    assert _offloads(engine) == (train.get("offload_optimizer", False), train.get("offload_params", False))
    assert engine.gradient_accumulation_steps() == 2
    params = list(engine.module.named_parameters())
    if stage3:
        # zero.Init's post-constructor hook counts each parameter it partitions as its module
        # is built: a model built whole and partitioned later by deepspeed.initialize adds none.
        assert constructed_under_init >= len(params)
        for name, p in params:
            # Released after partitioning: only this rank's shard (all of it, at world 1) is held.
            assert p.ds_status == ZeroParamStatus.NOT_AVAILABLE, name
            assert p.numel() == 0 and p.ds_numel == p.ds_shape.numel() > 0, name
            assert p.ds_tensor.numel() >= p.ds_numel and p.ds_zero_partition_world_size == 1, name
    else:
        assert constructed_under_init == 0
        assert not any(hasattr(p, "ds_id") for _, p in params)

    reference = _reference_losses(engine, cfg, micro, STEPS)
    losses = [train_step(engine, micro).loss for _ in range(STEPS)]
    assert losses[0] > 4.0  # ~ln(vocab) at init
    assert losses[-1] < 0.6 * losses[0], losses
    assert losses == pytest.approx(reference, rel=5e-4), (losses, reference)

    # Checkpoint, then one more step whose loss and weights a resumed engine must reproduce.
    state = {"step": STEPS, "case": case}
    save_checkpoint(engine, tokenizer, str(tmp_path), state, final=True)
    assert read_state(str(tmp_path)) == state
    trained = _clone(full_state_dict(engine))
    engine_logits = _logits(engine, micro[0])
    next_loss = train_step(engine, micro).loss
    next_lr = engine.get_lr()
    after_next = _clone(full_state_dict(engine))
    engine.destroy()
    del engine, built

    fresh = build_engine(_config(seed=1, **train), tokenizer, world_size=1, total_steps=TOTAL)
    before_load = full_state_dict(fresh.engine)
    assert not torch.equal(before_load["model.layers.0.self_attn.q_proj.weight"],
                           trained["model.layers.0.self_attn.q_proj.weight"])
    assert load_checkpoint(fresh.engine, str(tmp_path)) == state
    loaded = full_state_dict(fresh.engine)
    assert loaded.keys() == trained.keys()
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key
    # Same loss and update: the optimizer moments and the LR schedule came back too.
    assert fresh.engine.get_lr() == pytest.approx([cfg.train.lr * warmup_cosine(2, TOTAL)(STEPS)])
    assert train_step(fresh.engine, micro).loss == pytest.approx(next_loss, rel=1e-6)
    assert fresh.engine.get_lr() == pytest.approx(next_lr)  # the scheduler resumed at its step, not at 0
    resumed = full_state_dict(fresh.engine)
    for key in after_next:
        torch.testing.assert_close(resumed[key], after_next[key], rtol=1e-5, atol=1e-6, msg=key)
    fresh.engine.destroy()
    del fresh, before_load

    # The export is a plain model: loaded whole, not under a leftover ZeRO-3 config.
    assert not is_deepspeed_zero3_enabled()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR).eval()
    assert not any(hasattr(p, "ds_id") for p in exported.parameters())
    with torch.no_grad():
        export_logits = exported(input_ids=micro[0]["input_ids"], attention_mask=micro[0]["attention_mask"]).logits
    torch.testing.assert_close(export_logits, engine_logits, rtol=1e-5, atol=1e-5)
    print(f"\n[{case}] loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps, case {time.time() - started:.1f}s")


@pytest.mark.timeout(30)
def test_offload_options_that_need_another_stage_are_rejected():
    offload_optimizer = _config(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="train.offload_optimizer needs train.zero_stage >= 1"):
        deepspeed_config(offload_optimizer.train, offload_optimizer.student, 1)
    for stage in (0, 1, 2):
        offload_params = _config(zero_stage=stage, offload_params=True)
        with pytest.raises(ValueError, match=f"train.offload_params needs train.zero_stage=3 \\(got {stage}\\)"):
            deepspeed_config(offload_params.train, offload_params.student, 1)
