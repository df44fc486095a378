"""The embedded default's reasoning suite: seeded templated problems, and their oracle.

Sized for a ~1 M parameter student trained from scratch on a CPU in minutes (see
CALIBRATION.md): operands ≤ 9, values ≤ 99, carry-light, ~50 word-level tokens per
question + rationale. Families:
- mul_sub          a * b - c                               (2 steps)
- unit_conversion  made-up units, definitions not given    (2-3 steps, rare facts)
- chain            3-4 mixed + - * operations              (3-4 steps)

`solve` is the oracle teacher's brain: it recomputes answer, rationale, knowledge and
decomposition from the question text alone (the unit table is its world knowledge).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle

from distill_ray.tasks.record import Example
from distill_ray.tasks.synthetic_arith import (
    chain_build,
    chain_capacity,
    chain_parse,
    chain_render,
    chain_sample,
    mul_sub_build,
    mul_sub_capacity,
    mul_sub_parse,
    mul_sub_render,
    mul_sub_sample,
)
from distill_ray.tasks.synthetic_common import DEMO_NAMES, NAMES, Solution
from distill_ray.tasks.synthetic_units import (
    RARE_TRAIN_ITEMS,
    RARE_UNITS,
    is_rare,
    unit_build,
    unit_capacity,
    unit_parse,
    unit_pool,
    unit_render,
    unit_sample,
    units_in,
)

__all__ = ["FAMILIES", "RARE_UNITS", "Solution", "demonstrations", "generate", "solve"]


@dataclass(frozen=True)
class _Family:
    sample: Callable
    render: Callable
    parse: Callable
    build: Callable
    capacity: Callable[[int], int]


_REGISTRY: dict[str, _Family] = {
    "mul_sub": _Family(mul_sub_sample, mul_sub_render, mul_sub_parse, mul_sub_build, mul_sub_capacity),
    "unit_conversion": _Family(unit_sample, unit_render, unit_parse, unit_build, unit_capacity),
    "chain": _Family(chain_sample, chain_render, chain_parse, chain_build, chain_capacity),
}
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)

# Rejection sampling gives up after this many draws in a row that found nothing new
# (the space is then > 99.9 % used up), or this many draws per requested question: it
# turns "too few distinct questions" into an error instead of a hang.
_MAX_MISSES_IN_A_ROW = 2000
_DRAWS_PER_ITEM = 50


def solve(question: str) -> Solution | None:
    """Answer a suite question from its text alone; None when no template matches exactly."""
    text = " ".join(question.split())
    for fam in _REGISTRY.values():
        params = fam.parse(text)
        # Re-rendering rejects text that a lenient regex accepted but no generator writes.
        if params is not None and fam.render(params) == text:
            return fam.build(params)
    return None


def _example(family: str, id_: str, params, meta: dict) -> Example:
    fam = _REGISTRY[family]
    sol = fam.build(params)
    meta = {"family": family, "steps": len(sol.decomposition), **meta}
    if family == "unit_conversion":
        units = units_in(params)
        meta.update(units=units, rare=any(is_rare(u) for u in units))
    return Example(
        id=id_,
        task=f"synthetic/{family}",
        question=fam.render(params),
        answer=sol.answer,
        answer_type="number",
        rationale=sol.rationale,
        knowledge=sol.knowledge,
        decomposition=sol.decomposition,
        meta=meta,
    )


def _draw(
    family: str, split: str, n: int, seed: int, *, names: Sequence[str], exclude: set[str], id_prefix: str,
    long_tail: int = 0,
) -> list[Example]:
    fam = _REGISTRY[family]
    if n > fam.capacity(len(names)):
        raise ValueError(
            f"synthetic family {family!r}: {n} {split} questions requested, but the family "
            f"has at most {fam.capacity(len(names))} distinct questions"
        )
    # String seeds are hashed deterministically by `random`, unlike hash() of a str.
    rng = random.Random(f"synthetic/{family}/{seed}/{split}")
    rare_at: dict[int, str] = {}
    options = {}
    if family == "unit_conversion":
        pool = unit_pool(long_tail)
        options["pool"] = pool
        rare = [u.name for u in pool if is_rare(u.name)]
        if split == "train":
            n_rare = min(n, RARE_TRAIN_ITEMS * len(rare))
            rare_at = dict(zip(sorted(rng.sample(range(n), n_rare)), cycle(rare)))
    out: list[Example] = []
    seen: set[str] = set()
    misses = 0
    for _ in range(_DRAWS_PER_ITEM * n + 100):
        if len(out) == n or misses > _MAX_MISSES_IN_A_ROW:
            break
        params = fam.sample(rng, names, split=split, rare=rare_at.get(len(out)), **options)
        question = fam.render(params)
        if question in seen or question in exclude:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        out.append(_example(family, f"{id_prefix}/{len(out)}", params, {"split": split}))
    if len(out) < n:
        raise ValueError(
            f"synthetic family {family!r}: found only {len(out)} distinct {split} questions "
            f"of {n} requested (seed {seed}); ask for fewer"
        )
    return out


def _check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    if families is None:
        return FAMILIES
    if isinstance(families, str):
        raise ValueError(f"families must be a sequence of names, got the string {families!r}")
    chosen = tuple(families)
    unknown = [f for f in chosen if f not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown synthetic families {unknown}; known: {list(FAMILIES)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"families must be non-empty and without repeats, got {list(chosen)}")
    return chosen


def _shares(total: int, k: int) -> list[int]:
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def _interleave(groups: list[list[Example]]) -> list[Example]:
    """Round-robin over families, so any prefix is evenly mixed."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def generate(
    train_size: int, test_size: int, seed: int = 0, families: Sequence[str] | None = None, long_tail: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, test), families evenly mixed; no question appears in both splits.

    Each family's test split is drawn first from its own stream, so the test set does
    not change when only train_size does. Ids: synthetic/<family>/<seed>/<split>/<n>.
    `long_tail` adds that many rare made-up units to unit_conversion (synthetic_units.py).
    """
    _check_size("train_size", train_size)
    _check_size("test_size", test_size)
    chosen = _check_families(families)
    trains, tests = [], []
    for family, n_train, n_test in zip(chosen, _shares(train_size, len(chosen)), _shares(test_size, len(chosen))):
        prefix = f"synthetic/{family}/{seed}"
        test = _draw(family, "test", n_test, seed, names=NAMES, exclude=set(), id_prefix=f"{prefix}/test",
                     long_tail=long_tail)
        exclude = {ex.question for ex in test}
        train = _draw(family, "train", n_train, seed, names=NAMES, exclude=exclude, id_prefix=f"{prefix}/train",
                      long_tail=long_tail)
        trains.append(train)
        tests.append(test)
    return _interleave(trains), _interleave(tests)


def demonstrations(k: int, family: str | None = None, seed: int = 12345) -> list[Example]:
    """k fixed few-shot exemplars (round-robin over families unless `family` is given).

    They use DEMO_NAMES, which generated train/test questions never use, so they can
    never coincide with a generated question for any seed.
    """
    _check_size("k", k)
    chosen = _check_families(None if family is None else [family])
    groups = [
        _draw(f, "demo", n, seed, names=DEMO_NAMES, exclude=set(), id_prefix=f"synthetic/{f}/demo-{seed}")
        for f, n in zip(chosen, _shares(k, len(chosen)))
    ]
    return _interleave(groups)
