"""NesyCD vs Std-CoT on the rare-knowledge family: the same student, data, teacher and step budget.

    .venv/bin/python bench/nesycd_vs_std_cot.py [--seeds 0,1] [--set section.key=value ...]

For each seed, `distill-ray compare --methods std_cot,nesycd` (the seed changes the
student's initialisation and data order; the synthetic suite stays the same). Then
held-out accuracy on the unit_conversion family, split into questions that use one of the
rare units (seen in only a few training items) and the rest, side by side per seed and
as a mean. Predictions are read from each run's `predictions.jsonl`. With `--reuse`, a
method whose run already finished (its `summary.json` exists under the storage root) is
read back instead of trained again, so one side can be rerun after a change to the other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_ray.compare import run_compare  # noqa: E402
from distill_ray.config import load_config  # noqa: E402
from distill_ray.tasks.synthetic_units import is_rare, unit_parse, units_in  # noqa: E402

METHODS = ("std_cot", "nesycd")
UNIT_TASK = "synthetic/unit_conversion"


def slices(pred_file: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    units = [r for r in rows if r["task"] == UNIT_TASK]
    rare = [r for r in units if any(is_rare(u) for u in units_in(unit_parse(r["question"])))]
    common = [r for r in units if r not in rare]
    acc = lambda rs: sum(r["correct"] for r in rs) / len(rs) if rs else float("nan")  # noqa: E731
    return {"rare": acc(rare), "common": acc(common), "unit_all": acc(units), "overall": acc(rows),
            "n_rare": len(rare), "n_common": len(common)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reuse", action="store_true", help="read finished runs back instead of rerunning them")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = f"nesycd-bench-s{seed}"
        cfg = load_config(args.config, [*args.overrides, f"run_name={run}", f"seed={seed}", f"train.seed={seed}"])
        root = Path(cfg.storage.root)
        todo = tuple(m for m in METHODS if not (args.reuse and (root / f"{run}-{m}" / "summary.json").exists()))
        if todo:
            run_compare(cfg, todo)
        for m in METHODS:
            results[m].append({"seed": seed, **slices(root / f"{run}-{m}" / "predictions.jsonl")})
    print(f"\n{'seed':<6}{'method':<10}{'rare units':>12}{'common units':>14}{'unit family':>13}{'overall':>10}")
    for m in METHODS:
        for r in results[m]:
            print(f"{r['seed']:<6}{m:<10}{r['rare']:>11.1%}{r['common']:>13.1%}{r['unit_all']:>12.1%}{r['overall']:>9.1%}")
    for m in METHODS:
        mean = {k: statistics.mean(r[k] for r in results[m]) for k in ("rare", "common", "unit_all", "overall")}
        print(f"{'mean':<6}{m:<10}{mean['rare']:>11.1%}{mean['common']:>13.1%}{mean['unit_all']:>12.1%}{mean['overall']:>9.1%}")
    n = results[METHODS[0]][0]
    print(f"(held-out unit_conversion questions: {n['n_rare']} with a rare unit, {n['n_common']} without)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
