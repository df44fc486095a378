"""The plain training step, one process, no Ray: it learns, and weights mean what they say."""
from __future__ import annotations

import pytest
import torch

from distill_ray.config import Config
from distill_ray.train.data import collate, encode_rows, validate_rows
from distill_ray.train.engine import batch_geometry, build_optimizer, deepspeed_config, load_student_model, warmup_cosine
from distill_ray.train.step import LocalEngine, train_step, weighted_lm_loss
from distill_ray.train.student import TinySpec, tiny_model, train_tokenizer

ROWS = [
    {"prompt": f"Question: {a} * {b} = ?\nAnswer:", "target": f" {a} * {b} = {a * b} . Therefore, the answer is {a * b}."}
    for a, b in [(3, 4), (7, 8), (2, 9), (5, 5), (6, 1), (9, 9), (4, 0), (8, 3)]
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t for r in ROWS for t in (r["prompt"], r["target"])], vocab_size=300)


def test_step_learns_a_repeated_batch(tokenizer):
    cfg = Config.model_validate({"train": {"lr": 1e-2, "warmup_steps": 3}})
    model = tiny_model(tokenizer, TinySpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), seed=0)
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps=40)
    engine = LocalEngine(model, optimizer, scheduler, grad_accum=2)
    encoded, _ = encode_rows(tokenizer, validate_rows(ROWS), max_len=64)
    micro = [collate(encoded[:4], tokenizer.pad_token_id), collate(encoded[4:], tokenizer.pad_token_id)]
    losses = [train_step(engine, micro).loss for _ in range(40)]
    assert losses[0] > 4.0  # ~ln(vocab) at init
    assert losses[-1] < 0.25 * losses[0], losses[::5]
    stats = train_step(engine, micro)
    assert stats.target_tokens == sum(len(e.input_ids) - e.prompt_len for e in encoded)
    assert stats.tokens == sum(len(e.input_ids) for e in encoded)
    with pytest.raises(ValueError, match="got 1 micro-batches, the engine accumulates over 2"):
        train_step(engine, micro[:1])


def test_row_weights_scale_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    full, n = weighted_lm_loss(logits, labels, torch.tensor([1.0, 1.0]))
    assert n == 5  # labelled positions: 3 in row 0, 2 in row 1
    only_first, _ = weighted_lm_loss(logits, labels, torch.tensor([1.0, 0.0]))
    only_first.backward()
    assert logits.grad[1].abs().sum() == 0  # a weight-0 row contributes nothing
    half, _ = weighted_lm_loss(logits, labels, torch.tensor([0.5, 0.5]))
    assert half.item() == pytest.approx(0.5 * full.item())


def test_schedule_and_geometry():
    f = warmup_cosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    later = warmup_cosine(warmup_steps=10, total_steps=110, offset=60)  # a segment of the same schedule
    assert [later(s) for s in (0, 25, 50)] == [f(60), f(85), f(110)]
    cfg = Config.model_validate({"train": {"batch_size": 32, "num_workers": 2, "micro_batch_size": 4}})
    assert batch_geometry(cfg.train, 2) == (4, 4)
    ds = deepspeed_config(cfg.train, cfg.student, 2)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    bad = Config.model_validate({"train": {"batch_size": 32, "micro_batch_size": 5}})
    with pytest.raises(ValueError, match="micro_batch_size=5 must divide the per-worker batch"):
        batch_geometry(bad.train, 2)
    offload = Config.model_validate({"train": {"zero_stage": 2, "offload_params": True}})
    with pytest.raises(ValueError, match="offload_params needs train.zero_stage=3"):
        deepspeed_config(offload.train, offload.student, 2)


def test_init_from_continues_a_saved_student(tokenizer, tmp_path):
    spec = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 300}
    cfg = Config.model_validate({"student": {"tiny": spec}, "seed": 1})
    previous = tiny_model(tokenizer, TinySpec(**spec), seed=5)
    previous.save_pretrained(tmp_path)
    fresh = load_student_model(cfg, tokenizer)
    resumed = load_student_model(cfg, tokenizer, init_from=str(tmp_path))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(resumed.state_dict()[key], previous.state_dict()[key])
    assert not torch.equal(fresh.state_dict()[key], previous.state_dict()[key])


def test_extensions_dir_puts_this_environments_tools_first(tmp_path, monkeypatch):
    """Every process must build DeepSpeed's comm op with the same `ninja`: the one beside
    this interpreter, wherever PATH put it before."""
    import os
    import sys

    from distill_ray.train.prebuild import ensure_extensions_dir

    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bindir, "", "/bin"]))
    assert ensure_extensions_dir() == str(tmp_path / "ext")
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
    ensure_extensions_dir()  # idempotent: no second copy
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
