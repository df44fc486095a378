"""Teacher outputs a recipe can ask for, by name.

A recipe lists names in `needs`; the runner calls `collect_need` for each and hands the
recipe `{example id: output row}`. A new kind of teacher output (knowledge, error
analyses, decompositions) is one more entry in `_COLLECTORS`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Config
from ..tasks.record import Example


@dataclass
class NeedResult:
    by_id: dict[str, dict]
    stats: dict[str, float]
    versions: dict[str, int | None]


def run_tag(cfg: Config) -> str:
    """Runs sharing one LanceDB keep their own output tables (the call cache stays shared)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", cfg.run_name)


def _rationales(cfg: Config, examples: Sequence[Example]) -> NeedResult:
    from ..store import open_db, read_rows
    from .stage import collect_rationales

    result = collect_rationales(cfg, examples, run_tag=run_tag(cfg))
    rows = read_rows(open_db(cfg.lancedb_uri), result.rationales_table)
    return NeedResult({r["id"]: r for r in rows}, result.stats, result.table_versions)


_COLLECTORS: dict[str, Callable[[Config, Sequence[Example]], NeedResult]] = {"rationales": _rationales}


def collect_need(need: str, cfg: Config, examples: Sequence[Example]) -> NeedResult:
    try:
        collector = _COLLECTORS[need]
    except KeyError:
        raise ValueError(f"no teacher stage produces {need!r} (known: {', '.join(sorted(_COLLECTORS))})") from None
    return collector(cfg, examples)
