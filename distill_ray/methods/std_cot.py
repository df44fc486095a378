"""Std-CoT: fine-tune Q -> R + A on the teacher rationales whose answer matched the gold."""
from __future__ import annotations

from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainRow, question_prompt


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    kept = ctx.teacher["rationales"]
    return [TrainRow(question_prompt(ex.question), " " + kept[ex.id]["rationale"]) for ex in examples if ex.id in kept]


RECIPE = Recipe(
    name="std_cot",
    needs=("rationales",),
    train_rows=train_rows,
    description="question -> teacher rationale + answer",
)
