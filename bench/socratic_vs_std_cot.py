"""Socratic CoT vs Std-CoT on the longest-chain family at equal total trainable parameters.

    .venv/bin/python bench/socratic_vs_std_cot.py [--seeds 0,1,2] [--set section.key=value ...]

The synthetic `chain` family (3-4 steps) alone, the same teacher, data and optimizer-step
budget (`train.max_steps`, default: epochs over the training questions). The Socratic pair
trains its base in full and two LoRA adapters, so its trainable parameters are
base + 2 x adapter; the Std-CoT student is widened (`student.tiny.intermediate_size`)
until its parameter count is the nearest to that total, and both counts are printed.
Per seed (student initialisation and data order; the suite stays the same) one full
pipeline run per method under `runs/`, tracked in MLflow; then held-out accuracy side by
side, mean dialogue steps and inference FLOPs per example. With `--reuse`, a run that
already finished (its `summary.json` exists under the storage root) is read back instead
of run again: a long comparison can be extended one seed at a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_ray.config import Config, load_config  # noqa: E402
from distill_ray.pipeline import run_pipeline  # noqa: E402

FAMILY = "chain"


def _llama(cfg: Config, intermediate: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t = cfg.student.tiny
    config = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads, intermediate_size=intermediate,
                         max_position_embeddings=t.max_positions, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trainable_params(cfg: Config) -> tuple[int, int]:
    """(Socratic pair: base + 2 adapters, Std-CoT student) at the configured tiny shape."""
    import torch

    base = _llama(cfg, cfg.student.tiny.intermediate_size)
    s = cfg.method.socratic
    adapter = sum(s.adapter_rank * (m.in_features + m.out_features) for name, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in s.adapter_modules)
    return sum(p.numel() for p in base.parameters()) + 2 * adapter, sum(p.numel() for p in base.parameters())


def matched_intermediate(cfg: Config, target: int) -> int:
    """The Std-CoT student's intermediate size whose parameter count is nearest to `target`."""
    best = min(range(8, 8 * cfg.student.tiny.intermediate_size, 8),
               key=lambda i: abs(sum(p.numel() for p in _llama(cfg, i).parameters()) - target))
    return best


def _finished(cfg: Config) -> dict | None:
    """The eval metrics of a run that already finished under this config's run dir, if any."""
    summary = Path(cfg.run_dir) / "summary.json"
    if not summary.is_file():
        return None
    print(f"[bench] {cfg.run_name}: finished before, reading {summary}", flush=True)
    return json.loads(summary.read_text())["eval"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reuse", action="store_true", help="read finished runs' summary.json instead of rerunning them")
    args = parser.parse_args()
    common = [*args.overrides, f"tasks.synthetic.families=[{FAMILY}]", "train.time_budget_s=null"]
    probe = load_config(args.config, common)
    pair_params, base_params = trainable_params(probe)
    wide = matched_intermediate(probe, pair_params)
    std_params = sum(p.numel() for p in _llama(probe, wide).parameters())
    print(f"[bench] trainable parameters: socratic {pair_params:,} (base {base_params:,} + 2 adapters), "
          f"std_cot {std_params:,} (intermediate_size {wide})", flush=True)
    results: dict[str, list[dict]] = {"std_cot": [], "socratic": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method, extra in (("std_cot", [f"student.tiny.intermediate_size={wide}"]), ("socratic", [])):
            cfg = load_config(args.config, [*common, *extra, f"method.name={method}", f"run_name=socratic-bench-{method}-s{seed}",
                                            f"seed={seed}", f"train.seed={seed}"])
            m = _finished(cfg) if args.reuse else None
            m = m if m is not None else run_pipeline(cfg)["eval"].metrics
            results[method].append({"seed": seed, "accuracy": m["accuracy"], "flops": m["flops_total_mean"],
                                    "steps": m.get("steps_mean", float("nan"))})
    print(f"\n{'seed':<6}{'method':<10}{'accuracy':>10}{'FLOPs/ex':>12}{'dialogue steps':>16}")
    for method, rows in results.items():
        for r in rows:
            print(f"{r['seed']:<6}{method:<10}{r['accuracy']:>9.1%}{r['flops']:>12.3g}{r['steps']:>16.2f}")
    for method, rows in results.items():
        print(f"{'mean':<6}{method:<10}{statistics.mean(r['accuracy'] for r in rows):>9.1%}"
              f"{statistics.mean(r['flops'] for r in rows):>12.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
