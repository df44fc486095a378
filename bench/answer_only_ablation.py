"""Std-CoT vs the answer-only ablation: the same student, data, teacher and step budget.

    .venv/bin/python bench/answer_only_ablation.py [--set section.key=value ...]

`distill-ray compare` over the two methods (the second run reads the teacher from the
LanceDB cache; both train for the same number of steps), then held-out accuracy per
family side by side with the ratio. Each run is a full pipeline run under `runs/`,
tracked in MLflow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_ray.compare import run_compare  # noqa: E402
from distill_ray.config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "run_name=ablation"])
    rows = {r["method"]: r for r in run_compare(cfg, ("std_cot", "answer_only"))}
    cot, ans = rows["std_cot"], rows["answer_only"]
    print(f"\n{'task':<32}{'std_cot':>10}{'answer_only':>13}{'ratio':>8}")
    for key in sorted(k for k in cot if k.startswith("accuracy")):
        a, b = cot[key], ans.get(key, float("nan"))
        label = "overall" if key == "accuracy" else key.removeprefix("accuracy.")
        print(f"{label:<32}{a:>9.1%}{b:>12.1%}{(a / b if b else float('inf')):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
