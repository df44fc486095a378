"""Tasks: the example record, benchmark loaders, the synthetic suite, answer scoring."""
from distill_ray.tasks.answers import (
    ANSWER_TRIGGER,
    cut_at_next_question,
    extract_answer,
    is_correct,
    normalize_answer,
    score,
)
from distill_ray.tasks.loaders import (
    bbh_tasks,
    load_arc,
    load_bbh,
    load_bbh_cot_prompt,
    load_generic,
    load_gsm8k,
    load_strategyqa,
    split_examples,
)
from distill_ray.tasks.record import ANSWER_TYPES, Example, Step
from distill_ray.tasks.synthetic import FAMILIES, RARE_UNITS, Solution, demonstrations, generate, solve

__all__ = [
    "ANSWER_TRIGGER",
    "ANSWER_TYPES",
    "FAMILIES",
    "RARE_UNITS",
    "Example",
    "Solution",
    "Step",
    "bbh_tasks",
    "cut_at_next_question",
    "demonstrations",
    "extract_answer",
    "generate",
    "is_correct",
    "load_arc",
    "load_bbh",
    "load_bbh_cot_prompt",
    "load_generic",
    "load_gsm8k",
    "load_strategyqa",
    "normalize_answer",
    "score",
    "solve",
    "split_examples",
]
