"""GPU check of the training step, without Ray: tokens/s, MFU and peak memory, side by side.

    python bench/gpu_train.py                 # on one GPU: Qwen2-0.5B shape, 2048-token rows
    python bench/gpu_train.py --smoke         # anywhere: a tiny shape on CPU, checks the script runs

The model is built from a Qwen2-0.5B-shaped config with random weights (nothing is
downloaded: throughput does not depend on the weights). Every row is a full 2048-token
sequence, i.e. packed, no padding. Each variant runs `distill_ray.train.step.train_step`,
the function the Ray Train loop calls, on an engine:

  eager      fp32 master weights, bf16 autocast, torch AdamW: the plain transformers loop
  bf16       bf16 weights and optimizer state, fused AdamW (torchtune's default recipe)
  compiled   bf16 + torch.compile of every decoder layer
  deepspeed  the engine Ray Train uses (`train.engine.build_engine`), ZeRO stage --zero, bf16

MFU = model FLOPs / (step time × the card's dense bf16 peak), model FLOPs per token =
6·N_matmul + 12·L·d_attn·S (PaLM, appendix B; N_matmul counts the LM head). Needs
torch, transformers and, for the deepspeed variant, deepspeed. Prints one table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for annotations only; see below
    from distill_ray.train.step import LocalEngine

# The project's modules import transformers (seconds of CPU): each is imported where it is
# used, so a refused run (no GPU, no --smoke) ends at once.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 peak of the card, FLOP/s (no sparsity), by a fragment of torch's device name.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                 rope_theta=1e6, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)


@dataclass
class Result:
    variant: str
    micro_batch: int
    tokens_per_s: float
    mfu: float | None
    peak_gib: float
    loss: float


def qwen2_config(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**shape, attn_implementation="sdpa")


def build_model(config, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def batches(vocab: int, micro: int, seq: int, accum: int, device: torch.device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(accum):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device),
                    "attention_mask": torch.ones_like(ids).to(device), "weights": torch.ones(micro).to(device)})
    return out


class Autocast:
    """A LocalEngine whose forward runs under bf16 autocast (fp32 master weights)."""

    def __init__(self, engine: LocalEngine, device: torch.device):
        self.engine, self.device_type = engine, device.type

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.engine(**inputs)


def local_engine(variant: str, config, device: torch.device, lr: float):
    from distill_ray.train.step import LocalEngine

    dtype = torch.float32 if variant == "eager" else torch.bfloat16
    model = build_model(config, dtype, device)
    model.config.use_cache = False
    if variant == "compiled":
        for layer in model.model.layers:
            layer.compile()
    fused = device.type == "cuda" and variant != "eager"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), fused=fused)
    engine = LocalEngine(model, optimizer, grad_accum=1, gradient_clipping=1.0)
    return Autocast(engine, device) if variant == "eager" else engine


def deepspeed_engine(config, zero: int, micro: int, device: torch.device, lr: float, steps: int):
    """The Ray Train loop's engine, built by the same function, in a one-process group."""
    import tempfile

    import torch.distributed as dist

    from distill_ray.config import Config
    from distill_ray.train.engine import build_engine
    from distill_ray.train.prebuild import ensure_extensions_dir

    ensure_extensions_dir()  # DeepSpeed's comm op as `make install` built it, not a fresh JIT build
    if not dist.is_initialized():
        # The rendezvous a launcher would give; build_engine handles the rest of a one-process world.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = Config.model_validate({
        "student": {"dtype": "bfloat16"},
        "train": {"num_workers": 1, "zero_stage": zero, "batch_size": micro, "micro_batch_size": micro,
                  "lr": lr, "warmup_steps": 0, "use_gpu": device.type == "cuda"},
    })
    with tempfile.TemporaryDirectory() as arch:
        config.save_pretrained(arch)  # the shape only: weights start random, as nothing is loaded
        torch.manual_seed(0)
        return build_engine(cfg, None, 1, steps, architecture_from=arch).engine


def model_flops_per_token(config, seq: int) -> float:
    from distill_ray.evaluate.flops import flops_model_from_config

    fm = flops_model_from_config(config)
    return 6.0 * fm.matmul_params + 12.0 * fm.num_layers * fm.attn_dim * seq


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_variant(variant: str, args, config, device: torch.device) -> Result:
    from distill_ray.train.step import train_step

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if variant == "deepspeed":
        engine = deepspeed_engine(config, args.zero, args.micro_batch, device, args.lr, args.warmup + args.steps)
    else:
        engine = local_engine(variant, config, device, args.lr)
    data = [batches(config.vocab_size, args.micro_batch, args.seq, 1, device, seed=s) for s in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for s in range(args.warmup):
        train_step(engine, data[s % 4])
    sync()
    started, tokens, stats = time.perf_counter(), 0, None
    for s in range(args.steps):
        stats = train_step(engine, data[s % 4])
        tokens += stats.tokens
    sync()
    elapsed = time.perf_counter() - started
    rate = tokens / elapsed
    peak = peak_flops(device, args.peak_tflops)
    mfu = rate * model_flops_per_token(config, args.seq) / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del engine
    return Result(variant, args.micro_batch, rate, mfu, mem, stats.loss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="eager,bf16,compiled,deepspeed")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.micro_batch, args.steps, args.warmup = 64, 2, 2, 1
        device, shape = torch.device("cpu"), TINY
    else:
        if not torch.cuda.is_available():
            p.error("no GPU here: run with --smoke to check the script on CPU")
        device, shape = torch.device("cuda", 0), QWEN2_05B
    from distill_ray.evaluate.flops import flops_model_from_config

    config = qwen2_config(shape)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fm = flops_model_from_config(config)
    print(f"[gpu_train] {name}, torch {torch.__version__}; matmul params {fm.matmul_params / 1e6:.0f} M, "
          f"seq {args.seq}, micro-batch {args.micro_batch}, {args.steps} timed steps after {args.warmup}", flush=True)
    results = []
    for variant in args.variants.split(","):
        try:
            results.append(run_variant(variant, args, config, device))
        except Exception as e:  # noqa: BLE001 -- one variant failing (OOM, no deepspeed) must not hide the rest
            print(f"[gpu_train] {variant}: failed: {type(e).__name__}: {e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        r = results[-1]
        print(f"[gpu_train] {variant}: {r.tokens_per_s:,.0f} tokens/s", flush=True)
    print(f"\n{'variant':<10}{'micro':>6}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'loss':>8}")
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        print(f"{r.variant:<10}{r.micro_batch:>6}{r.tokens_per_s:>12,.0f}{mfu:>8}{r.peak_gib:>10.1f}{r.loss:>8.3f}")
    return 0 if len(results) == len(args.variants.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
