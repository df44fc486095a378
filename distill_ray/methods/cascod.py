"""CasCoD: the single Q -> R + A step cut in two, Q -> R and then Q + R -> A.

Trained as two tasks on the same rationales; at inference the student first writes
its reasoning, then (a second call, `follow_up`) reads it back and states the answer.
The reasoning target stops before the answer sentence, so the first call ends there.
"""
from __future__ import annotations

from ..tasks.answers import ANSWER_TRIGGER, without_answer_sentence
from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainRow, question_prompt


def answer_prompt(question: str, reasoning: str) -> str:
    return f"{question_prompt(question)} {reasoning.strip()}"


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    kept = ctx.teacher["rationales"]
    rows = []
    for ex in examples:
        if ex.id not in kept:
            continue
        reasoning = without_answer_sentence(kept[ex.id]["rationale"])
        if not reasoning:  # a bare answer sentence gives the first task nothing to learn
            continue
        rows.append(TrainRow(question_prompt(ex.question), " " + reasoning))
        rows.append(TrainRow(answer_prompt(ex.question, reasoning), f" {ANSWER_TRIGGER} {ex.answer}."))
    return rows


def follow_up(ex: Example, extras: dict, first_reply: str) -> str:
    # Whatever the student appended after its reasoning is dropped: the second call states the answer.
    return answer_prompt(ex.question, without_answer_sentence(first_reply) or first_reply)


RECIPE = Recipe(
    name="cascod",
    needs=("rationales",),
    train_rows=train_rows,
    follow_up=follow_up,
    description="Q -> R, then Q + R -> A (two calls at inference)",
)
