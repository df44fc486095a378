"""The `unit_conversion` family: made-up units whose definitions are never in the question.

"Ana has 3 zorps and 5 blips . How many blips is that ?" can only be answered by someone
who knows that 1 zorp = 4 blips. UNIT_TABLE is that world knowledge: the student must
learn it from training data, the oracle teacher looks it up. Training frequencies are
skewed on purpose, so that some facts are rare, which is what knowledge-augmented
methods (KARD, NesyCD, SKIntern) are meant to help with:
- the common units are drawn with Zipf weights 1/rank (the first is ~10x the tenth);
- each unit in RARE_UNITS appears in exactly RARE_TRAIN_ITEMS training examples;
- the test split draws every unit uniformly, so rare facts are well represented there.

A suite can add a long tail (`tasks.<name>.long_tail: N`): the first N of TAIL_UNITS,
each as rare as RARE_UNITS. Then most facts are rare, as in real knowledge, and no
student can memorise them all from the training data. The oracle knows every unit in
UNITS, tail included, whichever suite asks.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from distill_ray.tasks.record import Step
from distill_ray.tasks.synthetic_common import CARRY_KEEP, MAX_VALUE, Solution, answer_sentence, equation, has_carry


@dataclass(frozen=True)
class UnitDef:
    name: str
    base: str
    factor: int

    @property
    def fact(self) -> str:
        return f"1 {self.name} = {self.factor} {self.base}s"


# Ordered from most to least common in training data; the last four are the rare ones.
UNIT_TABLE: tuple[UnitDef, ...] = (
    UnitDef("zorp", "blip", 4),
    UnitDef("gorn", "dram", 3),
    UnitDef("quib", "blip", 6),
    UnitDef("snib", "dram", 4),
    UnitDef("fent", "blip", 3),
    UnitDef("wub", "dram", 6),
    UnitDef("mosk", "blip", 7),
    UnitDef("yelk", "dram", 7),
    UnitDef("trell", "blip", 8),
    UnitDef("crad", "dram", 2),
    UnitDef("vask", "blip", 5),
    UnitDef("hoff", "dram", 8),
    UnitDef("plim", "blip", 9),
    UnitDef("nurl", "dram", 5),
)
BASE_UNITS: tuple[str, ...] = ("blip", "dram")


def _tail_units(n: int) -> tuple[UnitDef, ...]:
    """n made-up units named consonant-vowel-consonant-vowel (the table's names end in a
    consonant, so none coincide), with seeded factors 2-9 and alternating base units."""
    rng = random.Random("synthetic/tail-units")
    names = [a + b + c + d for a in "bdfgklmnprtvz" for b in "aeiou" for c in "bdgklmnprtvz" for d in "aeiou"]
    rng.shuffle(names)
    return tuple(UnitDef(name, BASE_UNITS[i % 2], rng.randint(2, 9)) for i, name in enumerate(names[:n]))


TAIL_UNITS: tuple[UnitDef, ...] = _tail_units(200)
UNITS: dict[str, UnitDef] = {u.name: u for u in (*UNIT_TABLE, *TAIL_UNITS)}
RARE_UNITS: tuple[str, ...] = ("vask", "hoff", "plim", "nurl")
COMMON_UNITS: tuple[str, ...] = tuple(u.name for u in UNIT_TABLE if u.name not in RARE_UNITS)
RARE_TRAIN_ITEMS = 4
_ZIPF = {name: 1.0 / rank for rank, name in enumerate(COMMON_UNITS, start=1)}
_COMMON = frozenset(COMMON_UNITS)


def is_rare(unit: str) -> bool:
    """A unit the training split shows in only RARE_TRAIN_ITEMS questions (or not at all)."""
    return unit in UNITS and unit not in _COMMON


def unit_pool(long_tail: int = 0) -> tuple[UnitDef, ...]:
    """The units a suite uses: the table, plus the first `long_tail` of TAIL_UNITS."""
    if not isinstance(long_tail, int) or isinstance(long_tail, bool) or not 0 <= long_tail <= len(TAIL_UNITS):
        raise ValueError(f"long_tail must be an int from 0 to {len(TAIL_UNITS)}, got {long_tail!r}")
    return (*UNIT_TABLE, *TAIL_UNITS[:long_tail])


@dataclass(frozen=True)
class UnitConversion:
    """`count` of `unit` plus `count2` of `unit2`, where unit2 may be the base unit."""

    name: str
    count: int
    unit: str
    count2: int
    unit2: str

    @property
    def base(self) -> str:
        return UNITS[self.unit].base


_UNIT_RE = re.compile(
    r"(?P<name>[A-Z][a-z]+) has (?P<count>\d) (?P<unit>[a-z]+)s and (?P<count2>\d) (?P<unit2>[a-z]+)s \. "
    r"How many (?P<base>[a-z]+)s is that \?"
)


def _pick(rng: random.Random, candidates: Sequence[str], split: str) -> str:
    if split == "test":
        return rng.choice(candidates)
    common = [c for c in candidates if c in _ZIPF]
    return rng.choices(common, weights=[_ZIPF[c] for c in common])[0]


def unit_sample(rng: random.Random, names: Sequence[str], *, split: str, rare: str | None = None,
                pool: Sequence[UnitDef] = UNIT_TABLE) -> UnitConversion:
    """Train/demo draws use common units only, unless `rare` forces a rare one; test draws
    any unit of `pool`."""
    while True:
        unit = rare or _pick(rng, [u.name for u in pool], split)
        base = UNITS[unit].base
        if rng.random() < 0.5:
            unit2 = base
        else:
            unit2 = _pick(rng, [u.name for u in pool if u.base == base and u.name != unit], split)
        count, count2 = rng.randint(2, 9), rng.randint(2, 9)
        first = count * UNITS[unit].factor
        second = count2 * UNITS[unit2].factor if unit2 in UNITS else count2
        if first + second > MAX_VALUE:
            continue
        if not has_carry(first, "+", second) or rng.random() < CARRY_KEEP:
            return UnitConversion(rng.choice(names), count, unit, count2, unit2)


def unit_render(p: UnitConversion) -> str:
    return f"{p.name} has {p.count} {p.unit}s and {p.count2} {p.unit2}s . How many {p.base}s is that ?"


def unit_parse(question: str) -> UnitConversion | None:
    m = _UNIT_RE.fullmatch(question)
    if not m or m["unit"] not in UNITS:
        return None
    base = UNITS[m["unit"]].base
    unit2 = m["unit2"]
    if m["base"] != base or not (unit2 == base or (unit2 in UNITS and UNITS[unit2].base == base)):
        return None
    if unit2 == m["unit"]:
        return None
    return UnitConversion(m["name"], int(m["count"]), m["unit"], int(m["count2"]), unit2)


def _convert(count: int, unit: UnitDef) -> tuple[str, int]:
    text, value = equation(count, "*", unit.factor)
    return f"{unit.fact} . {text}", value


def unit_build(p: UnitConversion) -> Solution:
    first_text, first = _convert(p.count, UNITS[p.unit])
    steps = [Step(f"How many {p.base}s are {p.count} {p.unit}s ?", first_text)]
    knowledge = [UNITS[p.unit].fact]
    if p.unit2 in UNITS:
        second_text, second = _convert(p.count2, UNITS[p.unit2])
        steps.append(Step(f"How many {p.base}s are {p.count2} {p.unit2}s ?", second_text))
        knowledge.append(UNITS[p.unit2].fact)
    else:
        second = p.count2
    total_text, total = equation(first, "+", second)
    steps.append(Step(f"How many {p.base}s is that in total ?", total_text))
    # Facts first, then arithmetic: the order a person recalls and then computes.
    products = [s.answer.split(" . ")[1] for s in steps[:-1]]
    rationale = " . ".join([*knowledge, *products, total_text]) + f" . {answer_sentence(total)}"
    return Solution("unit_conversion", str(total), rationale, tuple(knowledge), tuple(steps))


def unit_capacity(n_names: int) -> int:
    pairs = sum(1 + sum(1 for v in UNIT_TABLE if v.base == u.base and v != u) for u in UNIT_TABLE)
    return n_names * 8 * 8 * pairs


def units_in(p: UnitConversion) -> list[str]:
    return [u for u in (p.unit, p.unit2) if u in UNITS]
