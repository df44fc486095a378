"""Std-CoT vs the answer-only ablation: the same student, data, teacher and step budget.

    .venv/bin/python bench/answer_only_ablation.py [--set section.key=value ...]

Runs the embedded default twice — `method.name=std_cot` then `answer_only` (the second
run reads the teacher from the LanceDB cache) — and prints held-out accuracy per family
side by side. Each run is a full pipeline run under `runs/`, tracked in MLflow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_ray.config import load_config  # noqa: E402
from distill_ray.pipeline import run_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    reports = {}
    for method in ("std_cot", "answer_only"):
        cfg = load_config(args.config, [*args.overrides, f"method.name={method}", f"run_name=ablation-{method}"])
        # Both train on the same kept examples with the same schedule (steps = epochs x rows
        # / batch); answer-only rows are shorter, so it sees fewer tokens per step.
        reports[method] = run_pipeline(cfg)
    cot, ans = reports["std_cot"]["eval"], reports["answer_only"]["eval"]
    print(f"\n{'task':<32}{'std_cot':>10}{'answer_only':>13}{'ratio':>8}")
    for task in sorted(cot.per_task):
        a, b = cot.per_task[task]["accuracy"], ans.per_task.get(task, {}).get("accuracy", float("nan"))
        print(f"{task:<32}{a:>9.1%}{b:>12.1%}{(a / b if b else float('inf')):>8.2f}")
    a, b = cot.metrics["accuracy"], ans.metrics["accuracy"]
    print(f"{'overall':<32}{a:>9.1%}{b:>12.1%}{(a / b if b else float('inf')):>8.2f}")
    for method, rep in reports.items():
        t = rep["train"]
        print(f"{method}: {t['steps']} steps on {t['rows']} rows, train wall {t.get('fit_wall_s', float('nan')):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
