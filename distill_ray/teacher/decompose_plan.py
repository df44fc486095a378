"""The decomposition query plan (Socratic CoT): the teacher splits each question into steps.

A reply is kept only when it is a decomposition (`decompose_prompts.parse_decomposition`),
its answer sentence matches the gold answer, and its last step concludes that answer
too: the Socratic pair reads its final answer off the last sub-answer, so a chain whose
last step says something else would teach it the wrong ending. Anything else is re-asked
at the next, higher temperature, like every plan (`cot_plan.reask_sampling`).
Outputs go to `decompositions_<run tag>`, failures to `decomposition_failures_<run tag>`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from distill_ray.client.requests import LLMRequest
from distill_ray.config import Config
from distill_ray.tasks.answers import ANSWER_TRIGGER, score
from distill_ray.tasks.record import Example, Step
from distill_ray.teacher.cot_plan import FewShot, check_reasks, per_synthetic_task, reask_sampling
from distill_ray.teacher.decompose_prompts import (
    DecompositionFormatError,
    decompose_messages,
    parse_decomposition,
    render_decomposition,
)
from distill_ray.teacher.prompts import Exemplar

DECOMPOSITIONS = "decompositions"
DECOMPOSITION_FAILURES = "decomposition_failures"

DECOMPOSITIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("answer_type", pa.string()),
        pa.field("decomposition", pa.string()),  # JSON [{"question": ..., "answer": ...}, ...]
        pa.field("steps", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("teacher_model", pa.string()),
    ]
)


def decomposition_row(row: dict, model: str) -> dict:
    return {
        "id": row["id"],
        "task": row["task"],
        "question": row["question"],
        "answer": row["answer"],
        "answer_type": row["answer_type"],
        "decomposition": row["decomposition"],
        "steps": len(json.loads(row["decomposition"])),
        "attempts": int(row["attempts"]),
        "teacher_model": model,
    }


def steps_of(row: dict) -> tuple[Step, ...]:
    """The steps of a `decompositions` row."""
    return tuple(Step(s["question"], s["answer"]) for s in json.loads(row["decomposition"]))


@dataclass(frozen=True)
class DecompositionPlan:
    model: str
    temperatures: tuple[float, ...]
    max_tries: int
    max_tokens: int
    shots: Mapping[str, FewShot] = field(default_factory=dict)  # by task name
    # The steps travel as JSON text: a failed row's payload is null (see knowledge_plan).
    payload_fields: tuple[str, ...] = ("pred", "decomposition")

    def __post_init__(self) -> None:
        check_reasks(self.temperatures, self.max_tries)

    def requests(self, row: dict, attempt: int) -> LLMRequest:
        shot = self.shots.get(row["task"], FewShot())
        temperature, seed = reask_sampling(self.temperatures, attempt)
        return LLMRequest("chat", model=self.model, messages=decompose_messages(row["question"], shot.exemplars, shot.preamble),
                          temperature=temperature, max_tokens=self.max_tokens, seed=seed)

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]:
        from distill_ray.methods.socratic_format import final_answer

        try:
            steps, answer_line = parse_decomposition(response_text)
        except DecompositionFormatError as e:
            return False, e.reason, {}
        example = Example.from_row(row)
        pred, ok = score(answer_line, example)
        payload = {"pred": pred, "decomposition": json.dumps([{"question": s.question, "answer": s.answer} for s in steps],
                                                             ensure_ascii=False)}
        if pred is None:
            return False, "no_answer", payload
        if not ok:
            return False, "wrong_answer", payload
        _, last_ok = score(f"{ANSWER_TRIGGER} {final_answer(steps)}.", example)
        return (True, "", payload) if last_ok else (False, "last_step_disagrees", payload)


def synthetic_decomposition_exemplars(k: int, family: str | None = None) -> list[Exemplar]:
    """k fixed synthetic demonstrations with their gold decompositions."""
    from distill_ray.tasks.synthetic import demonstrations

    return [(ex.question, render_decomposition(ex.decomposition or (), ex.answer)) for ex in demonstrations(k, family)]


def build_decomposition_plan(
    teacher_cfg,
    examples: Sequence[Example],
    exemplars: Mapping[str, Sequence[Exemplar] | FewShot] | None = None,
) -> DecompositionPlan:
    """The plan for `examples`; `exemplars` (by task: (question, rendered decomposition)
    pairs) overrides the synthetic defaults, e.g. from GSM8K's Socratic file."""
    made = per_synthetic_task(examples, teacher_cfg.few_shot, synthetic_decomposition_exemplars)
    shots = {task: FewShot(tuple(pairs)) for task, pairs in made.items()}
    for task, given in (exemplars or {}).items():
        shots[task] = given if isinstance(given, FewShot) else FewShot(tuple((q, r) for q, r in given))
    return DecompositionPlan(
        model=teacher_cfg.model,
        temperatures=tuple(float(t) for t in teacher_cfg.temperatures),
        max_tries=teacher_cfg.max_tries,
        max_tokens=teacher_cfg.max_tokens,
        shots=shots,
    )


def collect_decompositions(
    cfg: Config,
    examples: Sequence[Example],
    *,
    run_tag: str = "",
    progress: bool = True,
    exemplars: Mapping[str, Sequence[Exemplar] | FewShot] | None = None,
):
    """Socratic CoT: a decomposition per example into `decompositions`, failures into
    `decomposition_failures` (returns the stage's `TeacherStageResult`)."""
    from distill_ray.teacher.stage import StageOutput, run_plan

    plan = build_decomposition_plan(cfg.teacher, examples, exemplars)
    output = StageOutput("decompositions", DECOMPOSITIONS, DECOMPOSITIONS_SCHEMA, decomposition_row, DECOMPOSITION_FAILURES)
    return run_plan(cfg, examples, plan, output, run_tag=run_tag, progress=progress)
