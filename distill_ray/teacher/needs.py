"""Teacher outputs a recipe can ask for, by name.

A recipe lists names in `needs`; the runner calls `collect_need` for each and hands the
recipe `{example id: output row}`. Today: "rationales" (Std-CoT) and "knowledge"
(SKIntern's K, table `knowledge_<run tag>` with embeddings). A new kind of teacher
output (error analyses, decompositions) is one more entry in `_COLLECTORS`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Config
from ..tasks.record import Example


@dataclass
class NeedResult:
    table: str  # the LanceDB table holding the output (recipes may search it)
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
    return NeedResult(result.rationales_table, {r["id"]: r for r in rows}, result.stats, result.table_versions)


def _knowledge(cfg: Config, examples: Sequence[Example]) -> NeedResult:
    from ..knowledge.table import ROW_COLUMNS
    from ..store import open_db, read_rows
    from .stage import collect_knowledge

    result = collect_knowledge(cfg, examples, run_tag=run_tag(cfg))
    # Vectors stay in the table (recipes search it); rows in memory carry K only.
    rows = read_rows(open_db(cfg.lancedb_uri), result.table, version=result.table_versions[result.table],
                     columns=list(ROW_COLUMNS))
    return NeedResult(result.table, {r["id"]: r for r in rows}, result.stats, result.table_versions)


def _decompositions(cfg: Config, examples: Sequence[Example]) -> NeedResult:
    from ..store import open_db, read_rows
    from .decompose_plan import collect_decompositions

    result = collect_decompositions(cfg, examples, run_tag=run_tag(cfg))
    rows = read_rows(open_db(cfg.lancedb_uri), result.table, version=result.table_versions[result.table])
    return NeedResult(result.table, {r["id"]: r for r in rows}, result.stats, result.table_versions)


_COLLECTORS: dict[str, Callable[[Config, Sequence[Example]], NeedResult]] = {
    "rationales": _rationales,
    "knowledge": _knowledge,
    "decompositions": _decompositions,  # Socratic CoT: table `decompositions_<run tag>`
}


def collect_need(need: str, cfg: Config, examples: Sequence[Example]) -> NeedResult:
    try:
        collector = _COLLECTORS[need]
    except KeyError:
        raise ValueError(f"no teacher stage produces {need!r} (known: {', '.join(sorted(_COLLECTORS))})") from None
    return collector(cfg, examples)
