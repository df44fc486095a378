"""The two pure-arithmetic families: `mul_sub` (2 steps) and `chain` (3-4 steps).

Each family is four plain functions: sample (random parameters), render (parameters →
question), parse (question → parameters, the inverse of render) and build (parameters →
Solution). The oracle solves a question as build(parse(question)), the generator builds
an example as build(params) next to render(params); both meet in `build`, so the oracle
reproduces every gold field exactly.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from distill_ray.tasks.record import Step
from distill_ray.tasks.synthetic_common import (
    CARRY_KEEP,
    MAX_VALUE,
    OBJECTS,
    Solution,
    answer_sentence,
    equation,
    has_carry,
)

# ---------------------------------------------------------------- mul_sub: a * b - c


@dataclass(frozen=True)
class MulSub:
    name: str
    obj: str
    boxes: int
    per_box: int
    given: int


_MUL_SUB_RE = re.compile(
    r"(?P<name>[A-Z][a-z]+) has (?P<boxes>\d) boxes of (?P<per_box>\d) (?P<obj>[a-z]+) "
    r"and gives away (?P<given>\d) \. How many (?P=obj) are left \?"
)


def mul_sub_sample(rng: random.Random, names: Sequence[str], *, split: str, rare: str | None = None) -> MulSub:
    while True:
        boxes, per_box, given = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        total = boxes * per_box
        if given >= total:
            continue
        if not has_carry(total, "-", given) or rng.random() < CARRY_KEEP:
            return MulSub(rng.choice(names), rng.choice(OBJECTS), boxes, per_box, given)


def mul_sub_render(p: MulSub) -> str:
    return (
        f"{p.name} has {p.boxes} boxes of {p.per_box} {p.obj} and gives away {p.given} . "
        f"How many {p.obj} are left ?"
    )


def mul_sub_parse(question: str) -> MulSub | None:
    m = _MUL_SUB_RE.fullmatch(question)
    if not m:
        return None
    return MulSub(m["name"], m["obj"], int(m["boxes"]), int(m["per_box"]), int(m["given"]))


def mul_sub_build(p: MulSub) -> Solution:
    product, total = equation(p.boxes, "*", p.per_box)
    rest, answer = equation(total, "-", p.given)
    return Solution(
        family="mul_sub",
        answer=str(answer),
        rationale=f"{product} . {rest} . {answer_sentence(answer)}",
        knowledge=(product,),
        decomposition=(
            Step(f"How many {p.obj} are in the boxes ?", product),
            Step(f"How many {p.obj} are left ?", rest),
        ),
    )


def mul_sub_capacity(n_names: int) -> int:
    return n_names * len(OBJECTS) * 8 * 8 * 9


# ---------------------------------------------------------------- chain: 3-4 mixed ops

def _op_phrase(op: str, b: int) -> str:
    if op == "*":
        return "doubles them" if b == 2 else "triples them"
    return f"gets {b} more" if op == "+" else f"loses {b}"


def _op_subquestion(obj: str, op: str, b: int) -> str:
    if op == "*":
        return f"How many {obj} after {'doubling' if b == 2 else 'tripling'} ?"
    if op == "+":
        return f"How many {obj} after getting {b} more ?"
    return f"How many {obj} after losing {b} ?"


_OP_RES = (
    (re.compile(r"gets (\d) more"), "+"),
    (re.compile(r"loses (\d)"), "-"),
    (re.compile(r"doubles them"), "*2"),
    (re.compile(r"triples them"), "*3"),
)
_CHAIN_RE = re.compile(
    r"(?P<name>[A-Z][a-z]+) has (?P<start>\d) (?P<obj>[a-z]+) , (?P<ops>[a-z0-9 ,]+?) \. "
    r"How many (?P=obj) does (?P=name) have now \?"
)


@dataclass(frozen=True)
class Chain:
    name: str
    obj: str
    start: int
    ops: tuple[tuple[str, int], ...]


def _draw_ops(rng: random.Random, start: int, n_ops: int) -> tuple[tuple[str, int], ...] | None:
    value, ops = start, []
    for _ in range(n_ops):
        for _try in range(20):
            op = rng.choice("+-*")
            b = rng.choice((2, 3)) if op == "*" else rng.randint(1, 9)
            _, nxt = equation(value, op, b)
            if 1 <= nxt <= MAX_VALUE:
                break
        else:
            return None
        ops.append((op, b))
        value = nxt
    return tuple(ops)


def chain_sample(rng: random.Random, names: Sequence[str], *, split: str, rare: str | None = None) -> Chain:
    while True:
        start = rng.randint(2, 9)
        ops = _draw_ops(rng, start, rng.choice((3, 4)))
        # Mixing operations is the point of this family; one repeated operation is not a mix.
        if ops is None or len({op for op, _ in ops}) < 2:
            continue
        value, carried = start, False
        for op, b in ops:
            carried = carried or has_carry(value, op, b)
            _, value = equation(value, op, b)
        if not carried or rng.random() < CARRY_KEEP:
            return Chain(rng.choice(names), rng.choice(OBJECTS), start, ops)


def chain_render(p: Chain) -> str:
    steps = " , ".join(_op_phrase(op, b) for op, b in p.ops)
    return f"{p.name} has {p.start} {p.obj} , {steps} . How many {p.obj} does {p.name} have now ?"


def chain_parse(question: str) -> Chain | None:
    m = _CHAIN_RE.fullmatch(question)
    if not m:
        return None
    ops = []
    for phrase in m["ops"].split(" , "):
        for regex, op in _OP_RES:
            hit = regex.fullmatch(phrase)
            if hit:
                ops.append(("*", int(op[1])) if op.startswith("*") else (op, int(hit.group(1))))
                break
        else:
            return None
    if not 3 <= len(ops) <= 4:
        return None
    return Chain(m["name"], m["obj"], int(m["start"]), tuple(ops))


def chain_build(p: Chain) -> Solution:
    value, equations, steps, knowledge = p.start, [], [], []
    for op, b in p.ops:
        text, value = equation(value, op, b)
        equations.append(text)
        steps.append(Step(_op_subquestion(p.obj, op, b), text))
        if op == "*":
            knowledge.append(text)
    return Solution(
        family="chain",
        answer=str(value),
        rationale=" . ".join(equations) + f" . {answer_sentence(value)}",
        knowledge=tuple(knowledge),
        decomposition=tuple(steps),
    )


def chain_capacity(n_names: int) -> int:
    per_op = 9 + 9 + 2
    return n_names * len(OBJECTS) * 8 * (per_op**3 + per_op**4)
