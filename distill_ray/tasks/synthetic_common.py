"""Pieces shared by the synthetic families: vocabulary, the solution record, carries.

Texts are written for a word-level tokenizer that splits every digit and punctuation
mark, so every token is space separated ("gives away 5 ." not "gives away 5.") except
the final answer sentence, which follows the project-wide `Therefore, the answer is N.`
"""
from __future__ import annotations

from dataclasses import dataclass

from distill_ray.tasks.answers import ANSWER_TRIGGER
from distill_ray.tasks.record import Step

# Generated train/test questions only ever use NAMES; few-shot demonstrations only use
# DEMO_NAMES. The two sets are disjoint, so a demonstration can never repeat a train or
# test question, whatever seed either was drawn with.
NAMES = ("Ana", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy")
DEMO_NAMES = ("Max", "Zoe", "Kim")
OBJECTS = ("apples", "coins", "books", "pens", "cards", "shells", "stamps", "beads")

# Multi-digit addition and subtraction with carries is what a ~1 M parameter student
# fails at first (see CALIBRATION.md), so draws with a carry or borrow are kept only
# with this probability: carry-light, not carry-free.
CARRY_KEEP = 0.25
MAX_VALUE = 99


@dataclass(frozen=True)
class Solution:
    """Everything the oracle recomputes from a question's text."""

    family: str
    answer: str
    rationale: str
    knowledge: tuple[str, ...]
    decomposition: tuple[Step, ...]


def answer_sentence(value: int) -> str:
    return f"{ANSWER_TRIGGER} {value}."


def equation(x: int, op: str, y: int) -> tuple[str, int]:
    """("x op y = z", z) for op in + - *."""
    z = {"+": x + y, "-": x - y, "*": x * y}[op]
    return f"{x} {op} {y} = {z}", z


def has_carry(x: int, op: str, y: int) -> bool:
    """Whether computing x op y digit by digit needs a carry or a borrow."""
    if op == "+":
        return x % 10 + y % 10 >= 10
    if op == "-":
        return x % 10 < y % 10
    # A one-digit product is a times-table fact, not a carry.
    return x >= 10 and (x % 10) * y >= 10
