"""Knowledge-base entries and questions shared by the KB and NesyCD tests."""
from __future__ import annotations

from distill_ray.knowledge.kb import Entry, KnowledgeBase

UNITS = {"zorp": "blip", "gorn": "dram", "quib": "blip", "snib": "dram", "fent": "blip", "wub": "dram"}
PLIM = "Supplementary Knowledge: 1. 1 plim = 9 blips"
NURL = "Supplementary Knowledge: 1. 1 nurl = 5 drams"
CHAIN = "Learning Summary: 1. apply each change in the order it is told Supplementary Knowledge: 1. doubling means multiplying by 2"


def unit_question(unit: str, c1: int, c2: int) -> str:
    base = UNITS.get(unit, "blip")
    return f"Ana has {c1} {unit}s and {c2} {base}s . How many {base}s is that ?"


def make_kb(tmp_path, texts=(PLIM, NURL, CHAIN), **kw) -> KnowledgeBase:
    kb = KnowledgeBase(str(tmp_path / "lancedb"), "kb_test", "all-MiniLM-L6-v2", **kw)
    kb.add([Entry(t, "synthetic/unit_conversion", sources=(f"e{i}",), origin="teacher") for i, t in enumerate(texts)])
    return kb
