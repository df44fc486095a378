"""`distill-ray`: run the whole pipeline, one stage, or submit to a Ray cluster.

Exit codes: 0 success, 1 a stage failed, 2 bad configuration or unreachable teacher.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .config import ConfigError, load_config

USAGE_EPILOG = """examples:
  distill-ray run                                  # the embedded default, offline
  distill-ray run --set train.max_steps=100 --set tasks.synthetic.train_size=2000
  distill-ray run -c my.yaml --set teacher.kind=openai --set teacher.base_url=http://vllm:8000/v1
  distill-ray compare --set tasks.synthetic.train_size=3000 --methods std_cot,skintern
  distill-ray submit --address http://head:8265 --follow -c my.yaml
  distill-ray kb search "Ana has 3 plims and 5 blips . How many blips is that ?" --set run_name=nesycd
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="YAML config (default: the repo's ray_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-ray", description="Distil chain-of-thought reasoning from a teacher LLM into a small student, on Ray.",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("run", "all stages: collect → train → serve → eval, one MLflow parent run"),
        ("collect", "teacher stage only: query the teacher, store rationales in LanceDB"),
        ("train", "collect (cached) + train the student"),
        ("eval", "serve the trained student and evaluate it through the endpoint"),
        ("serve", "serve the trained student until interrupted"),
        ("config", "print the resolved configuration"),
    ]:
        _common(sub.add_parser(name, help=help_))
    cp = sub.add_parser("compare", help="run several methods on the same data and step budget; one table + plot")
    _common(cp)
    cp.add_argument("--methods", default=None, metavar="A,B,...",
                    help="comma-separated method names (default: std_cot,mt_cot,kard,cascod,skintern)")
    from .kb_cli import add_kb_parser

    add_kb_parser(sub, _common)
    sp = sub.add_parser("submit", help="submit `run` to a Ray cluster as a Ray job")
    _common(sp)
    sp.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    sp.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its outcome")
    sp.add_argument("--stage", default="run", choices=["run", "collect", "train", "eval"], help="what the job runs")
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    # `ray job stop`, Kubernetes and `kill` send SIGTERM: unwind like Ctrl-C so the
    # oracle, the MLflow server and Ray are shut down instead of left behind.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "kb":
        from .kb_cli import late_options

        late_options(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cfg = load_config(args.config, args.overrides)
        from .methods import get_recipe

        get_recipe(cfg.method.name)
        for name in (getattr(args, "methods", None) or "").split(","):
            if name.strip():
                try:
                    get_recipe(name.strip())
                except ValueError as e:
                    raise ValueError(f"--methods: {str(e).removeprefix('method.name: ')}") from None
    except (ConfigError, ValueError) as e:
        print(f"distill-ray: config error: {e}", file=sys.stderr)
        return 2
    from . import commands
    from .teacher.endpoint import TeacherUnreachable

    try:
        return commands.dispatch(args, cfg)
    except ConfigError as e:
        print(f"distill-ray: config error: {e}", file=sys.stderr)
        return 2
    except TeacherUnreachable as e:
        print(f"distill-ray: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-ray: interrupted; stopped what this run started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
