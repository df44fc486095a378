"""SKIntern: progressive fine-tuning from knowledge- and example-augmented inputs down to
the question alone (METHODS.md). The schedule lives in `distill_ray/curriculum/`.

Training is the curriculum (`run_curriculum`); `train_rows` are the last stage's rows,
question -> teacher rationale + answer, which is also what inference asks.
The curriculum is imported on use: it pulls in Ray Train, and the curriculum modules
import `methods.recipe`, which would make a module-level import circular.
"""
from __future__ import annotations

from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainJob, TrainRow, question_only


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    from ..curriculum.format import stage_prompt, target

    kept = ctx.teacher["rationales"]
    return [TrainRow(stage_prompt(ex.question), target(kept[ex.id]["rationale"])) for ex in examples if ex.id in kept]


def run_curriculum(job: TrainJob):
    from ..curriculum.run import run_curriculum as run

    return run(job)


RECIPE = Recipe(
    name="skintern",
    needs=("rationales", "knowledge"),
    train_rows=train_rows,
    prompt=question_only,
    train=run_curriculum,
    description="curriculum from question + compressed K + similar examples down to the question alone",
)
