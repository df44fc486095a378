"""`distill-ray kb`: read and edit a NesyCD knowledge base.

The KB is the LanceDB table `kb_<run_name>` under the configured storage (or `--table`).
Every change is one new table version; a served NesyCD student reads the latest version
at each request, so edits act at once. Bad input is refused before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import Config

ACTIONS = ("stats", "search", "show", "export", "import", "add", "rm", "reindex")


def add_kb_parser(sub, common) -> None:
    kp = sub.add_parser("kb", help="browse and edit a NesyCD knowledge base (stats, search, show, export, import, add, rm)")
    common(kp)
    kp.add_argument("--table", default=None, help="KB table name (default: kb_<run_name>)")
    actions = kp.add_subparsers(dest="kb_action", required=True)

    def action(name: str, **kw) -> argparse.ArgumentParser:
        # `kb stats --set run_name=x` reads as naturally as `kb --set run_name=x stats`:
        # each action takes the options too, under its own names (merged in `late_options`).
        p = actions.add_parser(name, **kw)
        p.add_argument("-c", "--config", dest="late_config", default=None, help=argparse.SUPPRESS)
        p.add_argument("--set", dest="late_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable (here or before the action)")
        p.add_argument("--table", dest="late_table", default=None, help=argparse.SUPPRESS)
        return p

    action("stats", help="entries, sources, tasks, version and indices")
    s = action("search", help="retrieve entries for a question, as the served student would")
    s.add_argument("query")
    s.add_argument("--mode", choices=("bm25", "dense", "hybrid"), default=None, help="default: method.nesycd.retrieval")
    s.add_argument("-k", type=int, default=None, help="entries to show (default: method.nesycd.top_k)")
    s.add_argument("--task-description", default="", help="prefixed to the query, as the endpoint does")
    show = action("show", help="one entry in full")
    show.add_argument("id")
    e = action("export", help="every entry as JSON lines")
    e.add_argument("path", help="output file ('-' for stdout)")
    i = action("import", help="add entries from JSON lines (each line checked first; a bad file changes nothing)")
    i.add_argument("path")
    a = action("add", help="add one entry written by hand")
    a.add_argument("text", help="the entry as the student should read it")
    a.add_argument("--task", default="", help="task the entry belongs to (e.g. synthetic/unit_conversion)")
    r = action("rm", help="delete entries by id")
    r.add_argument("ids", nargs="+")
    action("reindex", help="rebuild the full-text and vector indices")


def late_options(args: argparse.Namespace) -> None:
    """Fold the options given after the action into those given before it."""
    args.overrides = [*args.overrides, *getattr(args, "late_overrides", [])]
    args.config = getattr(args, "late_config", None) or args.config
    args.table = getattr(args, "late_table", None) or args.table


def _kb(args: argparse.Namespace, cfg: Config):
    from .methods.nesycd import knowledge_base

    kb = knowledge_base(cfg)
    if args.table:
        kb.name = args.table
    return kb


def run_kb(args: argparse.Namespace, cfg: Config) -> int:
    from .knowledge.kb import Entry, KBError

    kb = _kb(args, cfg)
    n = cfg.method.nesycd
    try:
        if args.kb_action == "stats":
            print(json.dumps(kb.stats(), indent=2))
        elif args.kb_action == "search":
            from .knowledge.kb_search import search

            hits = search(kb, [args.query], mode=args.mode or n.retrieval, k=args.k or n.top_k,
                          task_descriptions=[args.task_description])[0]
            for rank, h in enumerate(hits, start=1):
                floor = "" if h.similarity >= n.min_similarity else "  (below min_similarity: not given)"
                print(f"{rank}. [{h.id}] score {h.score:.4f} similarity {h.similarity:.3f}{floor}\n   {h.text}")
            if not hits:
                print("no entries found")
        elif args.kb_action == "show":
            print(json.dumps(kb.get(args.id), indent=2, ensure_ascii=False))
        elif args.kb_action == "export":
            if args.path == "-":
                for row in kb.rows():
                    print(json.dumps(row, ensure_ascii=False))
            else:
                print(f"exported {kb.export_jsonl(args.path)} entries of {kb.name} (version {kb.version}) to {args.path}")
        elif args.kb_action == "import":
            report = kb.import_jsonl(args.path)
            kb.build_indices()
            print(f"imported {len(report.added)} entries, {len(report.merged)} merged into near-duplicates; "
                  f"{kb.name} is at version {kb.version}")
        elif args.kb_action == "add":
            report = kb.add([Entry.from_dict({"text": args.text, "task": args.task, "origin": "user"}, where="add")])
            if report.added:
                print(f"added {report.added[0]}; {kb.name} is at version {kb.version}")
            else:
                print(f"merged into near-duplicate {report.merged[0][1]}; {kb.name} is at version {kb.version}")
        elif args.kb_action == "rm":
            version = kb.remove(args.ids)
            print(f"removed {len(set(args.ids))} entries; {kb.name} is at version {version}")
        elif args.kb_action == "reindex":
            kb.build_indices()
            print(f"rebuilt the indices of {kb.name} (version {kb.version})")
    except (KBError, OSError) as e:
        print(f"distill-ray kb: {e}", file=sys.stderr)
        return 2
    return 0
