"""What each CLI subcommand does, and the terminal summary."""
from __future__ import annotations

import argparse
import json
import time

from .config import Config


def print_summary(summary: dict) -> None:
    report = summary.get("eval")
    print()
    print("=" * 64)
    if report is not None:
        print(f"{'task':<36}{'n':>6}{'accuracy':>11}{'FLOPs/ex':>11}")
        for task, row in sorted(report.per_task.items()):
            print(f"{task:<36}{row['n']:>6}{row['accuracy']:>10.1%}{row['flops_mean']:>11.3g}")
        m = report.metrics
        print(f"{'overall':<36}{int(m['n']):>6}{m['accuracy']:>10.1%}{m['flops_total_mean']:>11.3g}")
        print(f"mean prompt tokens {m['prompt_tokens_mean']:.1f}, mean generated tokens {m['completion_tokens_mean']:.1f}")
    train = summary.get("train")
    if train:
        print(f"trained on {train['rows']} rows, {train['steps']} steps, "
              f"{train.get('tokens_per_s', float('nan')):.0f} tokens/s, {train.get('fit_wall_s', float('nan')):.0f} s")
    if "wall_s" in summary:
        print(f"total wall time {summary['wall_s']:.0f} s")
    if "ui_command" in summary:
        print(f"MLflow experiment '{summary['experiment']}', parent run {summary['parent_run_id']}")
        print(f"browse it with:\n  {summary['ui_command']}\n  then open http://127.0.0.1:5000")
    print("=" * 64)


def dispatch(args: argparse.Namespace, cfg: Config) -> int:
    from . import pipeline

    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "kb":
        from .kb_cli import run_kb

        return run_kb(args, cfg)
    if args.command == "submit":
        from .submit import submit

        return submit(args, cfg)
    if args.command == "compare":
        from .compare import DEFAULT_METHODS, run_compare

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else DEFAULT_METHODS
        run_compare(cfg, methods)
        return 0
    if args.command == "run":
        print_summary(pipeline.run_pipeline(cfg))
        return 0
    with pipeline.run_context(cfg) as ctx:
        if args.command in ("collect", "train"):
            method_ctx = pipeline.stage_collect(ctx)
            if args.command == "train":
                pipeline.stage_train(ctx, method_ctx)
                print_summary(ctx.summary)
            return 0
        model_dir = pipeline.trained_model_dir(cfg)
        if args.command == "eval":
            # The recipe's inference may read teacher outputs (KARD's knowledge): the
            # cache makes this a lookup, not a second round of teacher calls.
            pipeline.stage_eval(ctx, model_dir, pipeline.stage_collect(ctx))
            print_summary(ctx.summary)
            return 0
        if args.command == "serve":
            from .methods import get_recipe
            from .serve.deploy import deploy_student, remove_student

            url = deploy_student(cfg, model_dir, app=get_recipe(cfg.method.name).serve_app)
            print(f"serving {model_dir} at {url} (model name '{cfg.serve.model_name}'); Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            finally:
                remove_student()  # run_context stops Serve itself if this command started it
    raise AssertionError(f"unhandled command {args.command}")
